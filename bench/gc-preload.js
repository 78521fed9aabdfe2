'use strict';
// Preloaded (node --expose-gc -r) into the broker process of the scale case, and nothing else:
// on SIGUSR2 it runs full garbage collections and logs one JSON line, so the bench reads the
// broker's VmRSS after a GC settle instead of whenever the heap happened to be collected last.
// The broker itself is the unmodified CLI.
process.on('SIGUSR2', () => {
  global.gc();
  // A second pass after the event loop turns collects what the first one's finalizers released.
  setImmediate(() => {
    global.gc();
    process.stderr.write(
      `${JSON.stringify({
        level: 'info',
        message: 'bench gc settled',
        heapUsedBytes: process.memoryUsage().heapUsed,
      })}\n`,
    );
  });
});
