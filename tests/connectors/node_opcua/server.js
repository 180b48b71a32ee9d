// A small node-opcua server for the interoperability test: one press with a state, a part
// counter that counts up, and a sensor that reports BadSensorFailure. Prints "READY <url>".
"use strict";
// These come with node-opcua-server (its own dependencies, installed next to it).
const { OPCUAServer } = require("node-opcua-server");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const { DataValue } = require("node-opcua-data-value");
const { StatusCodes } = require("node-opcua-status-code");
const { Variant, DataType } = require("node-opcua-variant");
const { MessageSecurityMode } = require("node-opcua-service-secure-channel");
const { SecurityPolicy } = require("node-opcua-secure-channel");

(async () => {
  const port = parseInt(process.argv[2], 10);
  const pki = process.argv[3];
  const serverCertificateManager = new OPCUACertificateManager({
    rootFolder: pki,
    automaticallyAcceptUnknownCertificate: true,
  });
  const server = new OPCUAServer({
    port,
    resourcePath: "/UA/Press",
    serverCertificateManager,
    securityModes: [MessageSecurityMode.None, MessageSecurityMode.SignAndEncrypt],
    securityPolicies: [SecurityPolicy.None, SecurityPolicy.Basic256Sha256],
    allowAnonymous: true,
  });
  await server.initialize();
  const addressSpace = server.engine.addressSpace;
  const ns = addressSpace.registerNamespace("urn:interop:node-opcua:press");
  const press = ns.addObject({
    organizedBy: addressSpace.rootFolder.objects,
    browseName: "Press1",
    nodeId: "s=Press1",
  });
  let count = 0;
  ns.addVariable({
    componentOf: press,
    browseName: "State",
    nodeId: "s=Press1.State",
    dataType: "UInt16",
    minimumSamplingInterval: 100,
    value: { get: () => new Variant({ dataType: DataType.UInt16, value: 1 }) },
  });
  ns.addVariable({
    componentOf: press,
    browseName: "TotalCount",
    nodeId: "s=Press1.TotalCount",
    dataType: "UInt32",
    minimumSamplingInterval: 100,
    value: { get: () => new Variant({ dataType: DataType.UInt32, value: count }) },
  });
  ns.addVariable({
    componentOf: press,
    browseName: "Sensor",
    nodeId: "s=Press1.Sensor",
    dataType: "Double",
    minimumSamplingInterval: 100,
    value: {
      timestamped_get: () =>
        new DataValue({ statusCode: StatusCodes.BadSensorFailure, sourceTimestamp: new Date() }),
    },
  });
  setInterval(() => {
    count += 1;
  }, 100);
  await server.start();
  console.log("READY " + server.getEndpointUrl());
  process.on("SIGTERM", async () => {
    await server.shutdown(0);
    process.exit(0);
  });
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
