#!/usr/bin/env node
// A sample gRPC upstream (burrow.demo.v1.Greeter) for the demo and for trying Burrow by hand:
//   node examples/sample-upstream.js --listen 127.0.0.1:50051 --name site
// Prints one JSON line {"listening": "<host:port>"} on stdout once it accepts calls.
'use strict';
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function loadGreeter() {
  const def = protoLoader.loadSync(path.join(__dirname, 'proto', 'burrow', 'demo', 'v1', 'greeter.proto'), {
    keepCase: false,
    defaults: true,
  });
  return grpc.loadPackageDefinition(def).burrow.demo.v1.Greeter;
}

function startSampleUpstream(listen, name) {
  const Greeter = loadGreeter();
  const server = new grpc.Server();
  const agentOf = (call) => String(call.metadata.get('burrow-agent-id')[0] ?? '');
  server.addService(Greeter.service, {
    sayHello(call, cb) {
      cb(null, { message: `hello, ${call.request.name}`, answeredBy: name, callingAgent: agentOf(call) });
    },
    countdown(call) {
      for (let i = call.request.from; i >= 1; i--) call.write({ message: String(i), answeredBy: name });
      call.end();
    },
    chat(call) {
      call.on('data', (req) =>
        call.write({ message: `you said ${req.name}`, answeredBy: name, callingAgent: agentOf(call) }),
      );
      call.on('end', () => call.end());
    },
  });
  return new Promise((resolve, reject) =>
    server.bindAsync(listen, grpc.ServerCredentials.createInsecure(), (err, port) => {
      if (err) return reject(err);
      resolve({ server, address: `${listen.slice(0, listen.lastIndexOf(':'))}:${port}` });
    }),
  );
}

module.exports = { loadGreeter, startSampleUpstream };

if (require.main === module) {
  const arg = (flag, dflt) => {
    const i = process.argv.indexOf(flag);
    return i > 0 ? process.argv[i + 1] : dflt;
  };
  startSampleUpstream(arg('--listen', '127.0.0.1:50051'), arg('--name', 'sample')).then(
    ({ server, address }) => {
      process.stdout.write(`${JSON.stringify({ listening: address })}\n`);
      const stop = () => server.tryShutdown(() => process.exit(0));
      process.on('SIGTERM', stop);
      process.on('SIGINT', stop);
    },
    (err) => {
      process.stderr.write(`sample-upstream: ${err.message}\n`);
      process.exit(2);
    },
  );
}
