// Runs the Firestore emulator (@firestore-emulator/server) for Trinity's tests and local use.
//
//   node firestore/serve.mjs [PORT] [--host HOST] [--exit-on-stdin-close]
//
// PORT 0 (the default) binds any free port. Once the gRPC server listens, ONE line of JSON
// goes to stdout, e.g. {"host":"127.0.0.1","port":41817}: read the port from it, never guess.
// Clients then use FIRESTORE_EMULATOR_HOST=<host>:<port> and any GOOGLE_CLOUD_PROJECT.
// SIGTERM or SIGINT shut the server down and exit 0. With --exit-on-stdin-close the server
// also exits when its standard input closes, so a parent that dies (a killed pytest) leaves
// no orphan behind. Everything else the emulator says goes to stderr.
//
// Why not FirestoreServer.start(port): it binds 0.0.0.0 (every interface) and drops the
// port that gRPC bound, so port 0 could not be read back. We keep start() but let it bind
// HOST:PORT through the same gRPC server instance and capture the bound port.
import process from "node:process";

import { FirestoreServer } from "@firestore-emulator/server";

const USAGE = "usage: node serve.mjs [PORT] [--host HOST] [--exit-on-stdin-close]";
const SHUTDOWN_GRACE_MS = 2000;

function parseArgs(argv) {
  const options = { port: 0, host: "127.0.0.1", exitOnStdinClose: false };
  const rest = [...argv];
  while (rest.length > 0) {
    const arg = rest.shift();
    if (arg === "--host") {
      options.host = rest.shift();
      if (!options.host) throw new Error("--host needs a value");
    } else if (arg === "--exit-on-stdin-close") {
      options.exitOnStdinClose = true;
    } else if (/^\d+$/.test(arg) && Number(arg) <= 65535) {
      options.port = Number(arg);
    } else {
      throw new Error(`unexpected argument ${JSON.stringify(arg)}`);
    }
  }
  return options;
}

async function listen(emulator, host, port) {
  // `server` is the package's (TypeScript-private) grpc-js Server; start() calls its
  // bindAsync(address, credentials, callback) once.
  const grpcServer = emulator.server;
  if (typeof grpcServer?.bindAsync !== "function") {
    throw new Error("@firestore-emulator/server changed: FirestoreServer.server.bindAsync is gone");
  }
  const bindAsync = grpcServer.bindAsync.bind(grpcServer);
  let boundPort;
  grpcServer.bindAsync = (_address, credentials, callback) =>
    bindAsync(`${host}:${port}`, credentials, (err, bound) => {
      boundPort = bound;
      callback(err, bound);
    });
  await emulator.start(port);
  if (!Number.isInteger(boundPort) || boundPort <= 0) {
    throw new Error(`the emulator reported no bound port (got ${boundPort})`);
  }
  return boundPort;
}

function shutDown(emulator, why) {
  process.stderr.write(`firestore emulator: ${why}, shutting down\n`);
  const grpcServer = emulator.server;
  const force = setTimeout(() => {
    emulator.stop(); // forceShutdown: cancels calls still running
    process.exit(0);
  }, SHUTDOWN_GRACE_MS);
  force.unref();
  grpcServer.tryShutdown(() => process.exit(0));
}

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}\n`);
    process.exit(2);
  }
  const emulator = new FirestoreServer();
  let stopping = false;
  const stop = (why) => {
    if (stopping) return;
    stopping = true;
    shutDown(emulator, why);
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));

  const port = await listen(emulator, options.host, options.port);
  process.stdout.write(`${JSON.stringify({ host: options.host, port })}\n`);

  if (options.exitOnStdinClose) {
    process.stdin.on("end", () => stop("stdin closed"));
    process.stdin.on("error", () => stop("stdin failed"));
    process.stdin.resume();
  }
}

main().catch((err) => {
  process.stderr.write(`firestore emulator failed to start: ${err?.stack ?? err}\n`);
  process.exit(1);
});
