// A node-opcua server that offers only a signed and encrypted endpoint and trusts no client
// certificate it has not been given (the usual setting of a real PLC): an unknown client
// certificate lands in <pki>/rejected. Prints "READY <url>".
"use strict";
const { OPCUAServer } = require("node-opcua-server");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const { MessageSecurityMode } = require("node-opcua-service-secure-channel");
const { SecurityPolicy } = require("node-opcua-secure-channel");

(async () => {
  const port = parseInt(process.argv[2], 10);
  const pki = process.argv[3];
  const serverCertificateManager = new OPCUACertificateManager({
    rootFolder: pki,
    automaticallyAcceptUnknownCertificate: false,
  });
  const server = new OPCUAServer({
    port,
    resourcePath: "/UA/Press",
    serverCertificateManager,
    securityModes: [MessageSecurityMode.SignAndEncrypt],
    securityPolicies: [SecurityPolicy.Basic256Sha256],
    allowAnonymous: true,
  });
  await server.initialize();
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
