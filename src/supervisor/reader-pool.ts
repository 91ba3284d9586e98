/**
 * The reader threads. This module imports only piscina, so that the entry point can start the
 * threads before it loads anything heavier.
 */
import { Piscina } from 'piscina';

const READER_FILE = new URL('../../workers/slot-reader.js', import.meta.url).href;

/**
 * One thread per source, kept for the life of the process. Created first thing at start-up: a
 * thread loads its modules (pg, pino, the decoder) on another core while the main thread loads
 * its own and opens the buffer.
 */
export function createReaderPool(threads: number): Piscina {
  return new Piscina({
    filename: READER_FILE,
    minThreads: threads,
    maxThreads: threads,
    idleTimeout: Infinity,
    concurrentTasksPerWorker: 1,
    // 'sync' atomics freeze handles a task leaves open; our tasks are long-lived streams.
    atomics: 'disabled',
  });
}
