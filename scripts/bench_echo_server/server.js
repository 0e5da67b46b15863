// A cheap echo server for scripts/bench_load.py --server node (see that script's docstring).
//
//     node server.js PORT        # listens on 127.0.0.1:PORT until SIGTERM or SIGINT
//
// Why: on a small machine the Python echo server costs more CPU per call than the load
// generator, so the benchmark's client and server fill every core and a second worker has
// nothing left to run on. grpc-js answers a unary call for a fraction of that CPU.
//
// It serves the same methods as bench_load.py's Python server: GetItem of
// foodmesh.catalog.v1.CatalogService and /bench.Echo/Call (which the script's readiness
// check calls), both returning their request bytes untouched (raw Buffers, no
// (de)serializing: a GetItemRequest's bytes are a valid Item), and server reflection
// (grpc.reflection.v1 and v1alpha) describing catalog.proto, which `meshctl load` needs.

"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { ReflectionService } = require("@grpc/reflection");

const HOST = "127.0.0.1";
const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const CATALOG_PROTO = "foodmesh/catalog/v1/catalog.proto";

const raw = (buffer) => buffer;

function echoMethod(methodPath) {
  return {
    path: methodPath,
    requestStream: false,
    responseStream: false,
    requestSerialize: raw,
    requestDeserialize: raw,
    responseSerialize: raw,
    responseDeserialize: raw,
  };
}

function echo(call, callback) {
  callback(null, call.request);
}

function main(argv) {
  const port = Number(argv[0]);
  if (!Number.isInteger(port) || port <= 0 || port > 65535) {
    console.error("usage: node server.js PORT");
    process.exit(2);
  }
  const server = new grpc.Server({
    // Permit the keepalive pings mesh/keepalive.py's client options send.
    "grpc.keepalive_permit_without_calls": 1,
    // No per-call channelz bookkeeping: nothing here reads it, and it costs CPU per call.
    "grpc.enable_channelz": 0,
  });
  server.addService(
    { GetItem: echoMethod("/foodmesh.catalog.v1.CatalogService/GetItem") },
    { GetItem: echo },
  );
  server.addService({ Call: echoMethod("/bench.Echo/Call") }, { Call: echo });
  // keepCase: the proto's field names (item_id), as protoc and the Python stubs have them.
  const catalog = protoLoader.loadSync(CATALOG_PROTO, { includeDirs: [PROTOS], keepCase: true });
  new ReflectionService(catalog).addToServer(server);

  server.bindAsync(`${HOST}:${port}`, grpc.ServerCredentials.createInsecure(), (error) => {
    if (error) {
      console.error(`bench echo server: cannot bind ${HOST}:${port}: ${error.message}`);
      process.exit(1);
    }
  });
  const stop = () => {
    server.forceShutdown();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main(process.argv.slice(2));
