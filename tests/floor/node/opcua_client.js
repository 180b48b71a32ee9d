// A node-opcua client of the agent's OPC UA server (tests/floor): connects with
// Basic256Sha256 SignAndEncrypt and a user name, browses Objects/Plant, reads every variable
// (value, data type, engineering units) and subscribes to a few for a while.
// Usage: node opcua_client.js URL USER PASSWORD CERT_PEM KEY_PEM PKI_DIR APP_URI ALIGN WATCH...
// ALIGN: a DateTime variable; the values are read when it is on a whole minute (the cloud
// API answers windows of whole minutes exactly).
// Prints one line `RESULT {json}`; exits non-zero on failure.
"use strict";
const {
  OPCUAClient, MessageSecurityMode, SecurityPolicy, UserTokenType, AttributeIds, NodeClass,
  BrowseDirection, TimestampsToReturn, ClientSubscription, ClientMonitoredItem, DataType,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const [
  url, userName, password, certificateFile, privateKeyFile, pki, applicationUri, align, ...watch
] = process.argv.slice(2);

const plain = (variant) => {
  if (!variant || variant.dataType === DataType.Null) return null;
  const v = variant.value;
  if (variant.dataType === DataType.UInt64 || variant.dataType === DataType.Int64) {
    return v[0] * 4294967296 + v[1];
  }
  if (v instanceof Date) return v.toISOString();
  if (v && typeof v === "object" && "text" in v) return v.text;
  return v;
};

async function browseAll(session, nodeId, path, out) {
  const result = await session.browse({
    nodeId, browseDirection: BrowseDirection.Forward, includeSubtypes: true,
    referenceTypeId: "HierarchicalReferences", resultMask: 63,
  });
  for (const ref of result.references || []) {
    const name = ref.browseName.name;
    const child = ref.nodeId.toString();
    if (ref.nodeClass === NodeClass.Variable) {
      if (name === "EngineeringUnits") {
        out.units[path.join("/")] = child;
      } else {
        out.variables[[...path, name].join("/")] = child;
        await browseAll(session, child, [...path, name], out);
      }
    } else if (ref.nodeClass === NodeClass.Object) {
      await browseAll(session, child, [...path, name], out);
    }
  }
}

(async () => {
  const certificateManager = new OPCUACertificateManager({
    rootFolder: pki, automaticallyAcceptUnknownCertificate: true,
  });
  const client = OPCUAClient.create({
    applicationName: "plant-floor-test-hmi",
    applicationUri,
    securityMode: MessageSecurityMode.SignAndEncrypt,
    securityPolicy: SecurityPolicy.Basic256Sha256,
    certificateFile, privateKeyFile, clientCertificateManager: certificateManager,
    endpointMustExist: false,
    connectionStrategy: { maxRetry: 2, initialDelay: 500, maxDelay: 2000 },
  });
  await client.connect(url);
  const session = await client.createSession({ type: UserTokenType.UserName, userName, password });
  const found = { variables: {}, units: {} };
  const plant = (await session.browse("ObjectsFolder")).references
    .find((r) => r.browseName.name === "Plant");
  await browseAll(session, plant.nodeId.toString(), ["Plant"], found);
  const paths = Object.keys(found.variables);
  const read = async () => {
    const values = await session.read(paths.map((p) => ({
      nodeId: found.variables[p], attributeId: AttributeIds.Value,
    })));
    return Object.fromEntries(paths.map((p, i) => [p, plain(values[i].value)]));
  };
  // Two reads in a row that agree (one consistent picture between two engine updates),
  // with ALIGN on a whole minute.
  let values = await read();
  for (let i = 0; i < 1000; i++) {
    const again = await read();
    const through = again[align];
    if (JSON.stringify(again) === JSON.stringify(values) && through &&
        through.endsWith(":00.000Z")) break;
    values = again;
    await new Promise((resolve) => setTimeout(resolve, 150));
  }
  const types = await session.read(paths.map((p) => ({
    nodeId: found.variables[p], attributeId: AttributeIds.DataType,
  })));
  const dataTypes = Object.fromEntries(paths.map((p, i) => [p, types[i].value.value.toString()]));
  const unitPaths = Object.keys(found.units);
  const unitValues = await session.read(unitPaths.map((p) => ({
    nodeId: found.units[p], attributeId: AttributeIds.Value,
  })));
  const units = Object.fromEntries(unitPaths.map((p, i) => {
    const eu = unitValues[i].value.value;
    return [p, { unitId: eu.unitId, displayName: eu.displayName.text }];
  }));
  // Writing must be refused: the server is read-only.
  const write = await session.write({
    nodeId: found.variables[paths[0]], attributeId: AttributeIds.Value,
    value: { value: { dataType: DataType.String, value: "tampered" } },
  });
  const subscription = ClientSubscription.create(session, {
    requestedPublishingInterval: 200, requestedLifetimeCount: 100,
    requestedMaxKeepAliveCount: 10, publishingEnabled: true,
  });
  const notifications = {};
  for (const p of watch) {
    notifications[p] = [];
    const item = ClientMonitoredItem.create(
      subscription, { nodeId: found.variables[p], attributeId: AttributeIds.Value },
      { samplingInterval: 100, discardOldest: true, queueSize: 10 }, TimestampsToReturn.Both,
    );
    item.on("changed", (dv) => notifications[p].push(plain(dv.value)));
  }
  await new Promise((resolve) => setTimeout(resolve, 4000));
  await subscription.terminate();
  await session.close();
  await client.disconnect();
  process.stdout.write("RESULT " + JSON.stringify({
    values, dataTypes, units, notifications, writeStatus: write.name,
  }) + "\n");
  process.exit(0);
})().catch((err) => {
  process.stdout.write("ERROR " + String(err && err.stack || err) + "\n");
  process.exit(1);
});
