#!/usr/bin/env node
'use strict';
// The bench's upstream process: the test suite's raw-byte echo upstream (what every unary and
// streaming case calls, directly, through Burrow and through ssh) and, on its own port, the
// policy case's "floor": a trivial server answering PolicyDecisionService/Evaluate with a fixed
// permit, so the floor costs one gRPC hop and no decision work.
const path = require('node:path');
const { API_CODECS, POLICY_METHODS } = require('@burrow/tunnel');
const { serveIpc } = require('./ipc');

const HELPERS = path.join(__dirname, '..', 'test', 'dist', 'helpers');
const { EchoUpstream } = require(path.join(HELPERS, 'echo-upstream.js'));
const { startRawServer } = require(path.join(HELPERS, 'raw-grpc.js'));

async function main() {
  const echo = await new EchoUpstream().start();
  const permit = API_CODECS.evaluationResponse.encode({ decision: true });
  const floor = await startRawServer({
    [POLICY_METHODS.evaluate]: (call) => {
      call.on('error', () => {});
      call.on('data', () => {
        call.write(permit);
        call.end();
      });
    },
  });
  serveIpc({
    addresses: () => ({ echo: echo.address, floor: floor.address }),
    stop: async () => {
      await echo.stop();
      await floor.stop();
    },
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
