// Decodes Sparkplug B payloads with Eclipse Tahu's JavaScript implementation (npm
// sparkplug-payload): one base64 payload per stdin line in, one JSON object per line out.
// 64-bit values (Long) are written as decimal strings so nothing is rounded.
"use strict";
const { get } = require("sparkplug-payload");
const readline = require("readline");

const sparkplug = get("spBv1.0");
const plain = (value) => {
  if (value === null || value === undefined) return value === undefined ? null : value;
  if (typeof value === "object" && typeof value.low === "number" && typeof value.high === "number") {
    return value.toString();
  }
  if (Array.isArray(value)) return value.map(plain);
  if (value instanceof Uint8Array) return Buffer.from(value).toString("base64");
  if (typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
};

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  try {
    const payload = sparkplug.decodePayload(Buffer.from(line.trim(), "base64"));
    process.stdout.write(JSON.stringify(plain(payload)) + "\n");
  } catch (err) {
    process.stdout.write(JSON.stringify({ error: String(err) }) + "\n");
  }
});
