/**
 * Thread entry: piscina runs one task per source on its own thread, for as long as the source is
 * captured. It reads the task once and hands it to the reader; everything it says goes over the
 * task's MessagePort in the messages of src/common/protocol.ts.
 */
import { isMainThread } from 'node:worker_threads';
import type { ReaderResult, ReaderTask } from '../src/common/protocol.js';
import { SlotReader } from './reader.js';

if (isMainThread) {
  throw new Error('workers/slot-reader.js runs inside a worker thread started by the supervisor');
}

export default async function runReader(task: ReaderTask): Promise<ReaderResult> {
  return new SlotReader(task).run();
}
