// Three presses on a node-opcua server, run on a fixed schedule, for the conformance tests
// (tests/conformance/test_node_opcua.py). Not written by us on the protocol side: node-opcua
// from npm (installed in tests/connectors/node_opcua, found through NODE_PATH).
//
//   node plc.js PORT PKI_DIR ORDER
//
// ORDER is the order the machines' namespaces are registered in ("abc" or "cba"), so a
// restart can renumber them. The presses stand (planned stop) until the schedule starts
// (see the commands below). A restarted server is given the first one's epoch and carries
// on where the schedule is, like a PLC whose OPC UA server restarted.
//
// Ground truth, one JSON object per line on stdout:
//   {"ev":"initialized"}               address space built, waiting for LISTEN
//   {"ev":"ready","url":...}            listening
//   {"ev":"epoch","epoch":ms}          the schedule started
//   {"ev":"state","machine":m,"t":ms,"state":s,"reason":code}   state or reason set (t is
//                                       the source timestamp both nodes were given)
//   {"ev":"end","machine":m,"produced":n,"scrap":n,"good":n}    parts made by the schedule
"use strict";
const { OPCUAServer } = require("node-opcua-server");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const { Variant, DataType } = require("node-opcua-variant");
const { StatusCodes } = require("node-opcua-status-code");

const TICK_MS = 100;
const WRAP = 2 ** 32;
const STATES = { idle: 0, running: 1, fault: 2, setup: 3, planned_stop: 4 };
// Segments in ticks: [until_tick, state, reason code]. Every press runs from tick 25 to 75,
// the window in which the tests restart the server.
const MACHINES = [
  {
    id: "press-a",
    // total + scrap, both about to wrap at 32 bits
    counters: { TotalCount: WRAP - 30, ScrapCount: WRAP - 2 },
    scrapEvery: 5,
    segments: [
      [8, "running", 0], [18, "fault", 3], [80, "running", 0], [90, "idle", 1],
      [100, "running", 0], [108, "fault", 2], [110, "running", 0],
    ],
  },
  {
    id: "press-b",
    counters: { TotalCount: WRAP - 10, ScrapCount: 5 },
    scrapEvery: 7,
    segments: [
      [5, "running", 0], [12, "fault", 2], [20, "running", 0], [24, "idle", 1],
      [78, "running", 0], [92, "fault", 3], [110, "running", 0],
    ],
  },
  {
    id: "press-c",
    // total + good (no scrap counter): scrap is what is not good
    counters: { TotalCount: WRAP - 50, GoodCount: WRAP - 40 },
    scrapEvery: 4,
    segments: [
      [12, "running", 0], [22, "fault", 3], [85, "running", 0], [95, "fault", 1],
      [103, "running", 0], [108, "setup", 0], [110, "running", 0],
    ],
  },
];
const END_TICK = 110;

function segmentAt(machine, tick) {
  if (tick < 0 || tick >= END_TICK) return ["planned_stop", 0];
  for (const [until, state, reason] of machine.segments) {
    if (tick < until) return [state, reason];
  }
  return ["planned_stop", 0];
}

// The machine in tick `ticks` of the schedule: its registers and the parts made so far. A
// part made in a running tick is counted in that tick's scan, so a scan that stops the
// press never counts one (the part belongs to the state before or after without doubt).
function machineAt(machine, ticks) {
  let produced = 0;
  let scrap = 0;
  let phase = 0;
  for (let k = 0; k < Math.min(ticks + 1, END_TICK); k++) {
    if (segmentAt(machine, k)[0] !== "running") continue;
    phase += 1;
    if (phase % 2 === 0) {
      produced += 1; // a part every second running tick
      if (produced % machine.scrapEvery === 0) scrap += 1;
    }
  }
  const [state, reason] = segmentAt(machine, ticks < 0 ? -1 : Math.min(ticks, END_TICK));
  const c = machine.counters;
  const values = { State: STATES[state], Reason: reason, TotalCount: (c.TotalCount + produced) % WRAP };
  if ("ScrapCount" in c) values.ScrapCount = (c.ScrapCount + scrap) % WRAP;
  if ("GoodCount" in c) values.GoodCount = (c.GoodCount + produced - scrap) % WRAP;
  return { produced, scrap, state, reason, values };
}

const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

(async () => {
  const [portArg, pki, order] = process.argv.slice(2);
  const port = parseInt(portArg, 10);
  let epoch = null;
  const server = new OPCUAServer({
    port,
    resourcePath: "/UA/Presses",
    serverCertificateManager: new OPCUACertificateManager({
      rootFolder: pki,
      automaticallyAcceptUnknownCertificate: true,
    }),
    allowAnonymous: true,
  });
  await server.initialize();
  const addressSpace = server.engine.addressSpace;
  const byLetter = Object.fromEntries(MACHINES.map((m) => [m.id.slice(-1), m]));
  const nodes = {};
  for (const letter of order) {
    const machine = byLetter[letter];
    const ns = addressSpace.registerNamespace(`urn:conformance:${machine.id}`);
    const obj = ns.addObject({
      organizedBy: addressSpace.rootFolder.objects,
      browseName: machine.id,
      nodeId: `s=${machine.id}`,
    });
    nodes[machine.id] = {};
    const initial = machineAt(machine, -1).values;
    for (const [name, value] of Object.entries(initial)) {
      const counter = name.endsWith("Count");
      nodes[machine.id][name] = ns.addVariable({
        componentOf: obj,
        browseName: name,
        nodeId: `s=${machine.id}.${name}`,
        dataType: counter ? "UInt32" : "UInt16",
        minimumSamplingInterval: 50,
        value: new Variant({ dataType: counter ? DataType.UInt32 : DataType.UInt16, value }),
      });
    }
  }
  const last = {};
  let ended = false;
  // One scan: every node of a press that changed gets the same source timestamp.
  const scan = () => {
    const ticks = epoch === null ? -1 : Math.floor((Date.now() - epoch) / TICK_MS);
    const now = new Date();
    for (const machine of MACHINES) {
      const m = machineAt(machine, ticks);
      const prev = last[machine.id];
      for (const [name, value] of Object.entries(m.values)) {
        if (prev && prev.values[name] === value) continue;
        const counter = name.endsWith("Count");
        nodes[machine.id][name].setValueFromSource(
          new Variant({ dataType: counter ? DataType.UInt32 : DataType.UInt16, value }),
          StatusCodes.Good,
          now
        );
      }
      if (!prev || prev.state !== m.state || prev.reason !== m.reason) {
        say({ ev: "state", machine: machine.id, t: now.getTime(), state: m.state, reason: m.reason });
      }
      last[machine.id] = m;
    }
    if (!ended && ticks >= END_TICK) {
      ended = true;
      for (const machine of MACHINES) {
        const m = machineAt(machine, END_TICK);
        say({ ev: "end", machine: machine.id, produced: m.produced, scrap: m.scrap, good: m.produced - m.scrap });
      }
    }
  };
  // Commands on stdin, one a line: "LISTEN [EPOCH_MS]" starts the schedule clock (when
  // given) and the server; "GO" starts the schedule now. A server to take over after a
  // restart is started beforehand and only listens when told, so the restart takes no
  // longer than the agent's reconnect, however slowly node starts up.
  let listening = false;
  const command = async (line) => {
    const [verb, arg] = line.trim().split(/\s+/);
    if (verb === "LISTEN" && !listening) {
      listening = true;
      if (arg) epoch = parseInt(arg, 10);
      scan();
      setInterval(scan, TICK_MS / 4);
      await server.start();
      say({ ev: "ready", url: server.getEndpointUrl(), order });
    } else if (verb === "GO" && epoch === null) {
      epoch = Date.now();
      say({ ev: "epoch", epoch });
      scan();
    }
  };
  require("readline")
    .createInterface({ input: process.stdin })
    .on("line", (line) => command(line).catch((err) => {
      console.error(err);
      process.exit(1);
    }));
  say({ ev: "initialized", order });
  process.on("SIGTERM", () => process.exit(0));
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
