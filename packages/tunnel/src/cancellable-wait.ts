import type { EventEmitter } from 'node:events';

/**
 * Runs `wait` with `abort`'s signal and aborts it when the client cancels `call` (its `cancelled`
 * event) while the wait is on: how a call waiting for an agent's tunnel stream stops waiting for
 * a client that has gone. The owner may abort `abort` itself too (a credential cut). Resolves or
 * rejects as `wait` does; the listener is removed either way.
 */
export async function waitCancellable<T>(
  call: Pick<EventEmitter, 'on' | 'removeListener'>,
  abort: AbortController,
  wait: (signal: AbortSignal) => Promise<T>,
): Promise<T> {
  const onCancel = (): void => abort.abort();
  call.on('cancelled', onCancel);
  try {
    return await wait(abort.signal);
  } finally {
    call.removeListener('cancelled', onCancel);
  }
}
