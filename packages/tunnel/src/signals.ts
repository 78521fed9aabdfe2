import type { Logger } from './logger';

/**
 * Runs a daemon (broker or agent) until SIGTERM/SIGINT: `start`, then on the first signal `stop`
 * (a graceful drain) and exit 0; a second signal exits at once with 1. The handlers go in before
 * `start`: the "started" line is logged inside it, and a supervisor's SIGTERM sent on seeing it
 * must drain, not kill the process by Node's default action. A failing `start` goes to `onStartFailed`.
 */
export async function runUntilSignalled(
  logger: Logger,
  start: () => Promise<unknown>,
  stop: () => Promise<void>,
  onStartFailed: (err: Error) => never,
): Promise<void> {
  let started: Promise<unknown> = Promise.resolve();
  let signals = 0;
  const shutdown = (signal: string): void => {
    if (++signals > 1) {
      logger.warn('second signal; exiting now', { signal });
      process.exit(1);
    }
    logger.info('shutting down', { signal });
    started
      .then(() => stop())
      .then(
        () => process.exit(0),
        (err: Error) => {
          logger.error('shutdown failed', { error: err.message });
          process.exit(1);
        },
      );
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));
  started = start();
  try {
    await started;
  } catch (err) {
    onStartFailed(err as Error);
  }
}
