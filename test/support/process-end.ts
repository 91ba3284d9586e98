/**
 * Synchronous cleanup when the test process ends, however it ends short of SIGKILL.
 *
 * Vitest stops a fork with SIGTERM, whose default action skips 'exit' handlers; Ctrl-C sends
 * SIGINT to the whole process group. Without these hooks a postmaster (which pg_ctl detaches
 * into its own session) or a spawned CLI outlives the test run.
 */
const cleanups = new Set<() => void>();
const SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];
let installed = false;

function runAll(): void {
  for (const fn of cleanups) {
    try {
      fn();
    } catch {
      // Best effort: one failed cleanup must not keep the others from running.
    }
  }
}

function onSignal(sig: NodeJS.Signals): void {
  runAll();
  // Re-raise with our listeners gone so the process ends the way it would have without us
  // (killed by the signal), unless someone else listens and decides otherwise.
  for (const s of SIGNALS) process.removeListener(s, onSignal);
  process.kill(process.pid, sig);
}

/** Registers `fn` (synchronous only: nothing async runs at this point) to run at process end. */
export function onProcessEnd(fn: () => void): void {
  cleanups.add(fn);
  if (installed) return;
  installed = true;
  process.on('exit', runAll);
  for (const s of SIGNALS) process.on(s, onSignal);
}
