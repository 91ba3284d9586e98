import { setTimeout as delay } from 'node:timers/promises';

export interface WaitForOptions {
  /** Overall deadline, including the time spent inside `fn`. Default 30 000 ms. */
  timeoutMs?: number;
  /** Pause between two calls of `fn`. Default 100 ms. */
  intervalMs?: number;
  /** Completes the message "timed out after Nms waiting for <what>". */
  what: string;
  /** Errors that end the wait at once (rethrown) instead of counting as "not yet". */
  fatal?: (error: unknown) => boolean;
}

type Falsy = undefined | false;

const NOT_YET = Symbol('not yet');

/**
 * Calls `fn` until it returns a truthy value and resolves with that value. A throw counts as
 * "not yet" (the last one is reported at the deadline), so `fn` can be a query against a server
 * that is still coming up.
 */
export async function waitFor<T>(
  fn: () => Promise<T | Falsy> | T | Falsy,
  opts: WaitForOptions,
): Promise<T> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const intervalMs = opts.intervalMs ?? 100;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown = undefined;
  let lastValue: unknown = undefined;

  for (;;) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) break;
    try {
      // Race each call against the deadline: a call that hangs (a TCP connect to a server
      // that never answers) must not hold the caller past the timeout it asked for.
      const value = await raceDeadline(Promise.resolve().then(fn), remaining);
      if (value !== NOT_YET) {
        if (value) return value;
        lastValue = value;
      }
    } catch (err) {
      if (opts.fatal?.(err)) throw err;
      lastError = err;
    }
    const pause = Math.min(intervalMs, deadline - Date.now());
    if (pause > 0) await delay(pause);
  }

  const detail =
    lastError === undefined ? `none (last value: ${String(lastValue)})` : describe(lastError);
  throw new Error(
    `timed out after ${timeoutMs}ms waiting for ${opts.what}; last error: ${detail}`,
    {
      cause: lastError,
    },
  );
}

async function raceDeadline<T>(p: Promise<T>, ms: number): Promise<T | typeof NOT_YET> {
  const ac = new AbortController();
  try {
    const deadline: Promise<typeof NOT_YET> = delay(ms, undefined, { signal: ac.signal }).then(
      () => NOT_YET,
      () => NOT_YET,
    );
    return await Promise.race([p, deadline]);
  } finally {
    ac.abort();
  }
}

function describe(err: unknown): string {
  if (err instanceof Error) {
    const code = (err as { code?: unknown }).code;
    return typeof code === 'string' ? `${err.message} (${code})` : err.message;
  }
  return String(err);
}
