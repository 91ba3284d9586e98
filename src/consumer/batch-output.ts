/**
 * `consume`'s two handlers: a batch as JSON lines to stdout, or to a command's stdin (--exec).
 * Each returns once the batch is out of this process's hands — written to the pipe, or the
 * command exited 0 — and the group's position then moves past it.
 */
import { spawn } from 'node:child_process';
import type { Writable } from 'node:stream';
import type { ConsumedBatch } from './consumer.js';

export function jsonLines(batch: ConsumedBatch): string {
  let out = '';
  for (const record of batch.records) out += `${JSON.stringify(record)}\n`;
  return out;
}

/** Written when the stream has taken it (the pipe's reader may not have read it yet). */
export function printBatch(batch: ConsumedBatch, stream: Writable): Promise<void> {
  return new Promise((resolve, reject) => {
    stream.write(jsonLines(batch), (error) => (error ? reject(error) : resolve()));
  });
}

/**
 * Runs `command` with the batch on its stdin (its stdout and stderr are this process's) and
 * resolves if it exits 0. PHILOTES_GROUP, PHILOTES_SOURCE and PHILOTES_RECORDS tell it what it has.
 */
export function execBatch(batch: ConsumedBatch, command: string, group: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('/bin/sh', ['-c', command], {
      stdio: ['pipe', 'inherit', 'inherit'],
      env: {
        ...process.env,
        PHILOTES_GROUP: group,
        PHILOTES_SOURCE: batch.source,
        PHILOTES_RECORDS: String(batch.records.length),
      },
    });
    child.once('error', reject);
    // A command that does not read all of its stdin is its own business: its exit code decides.
    child.stdin.once('error', () => undefined);
    child.stdin.end(jsonLines(batch));
    child.once('exit', (code, signal) => {
      if (code === 0) resolve();
      else
        reject(
          new Error(
            `--exec command ${signal !== null ? `was killed by ${signal}` : `exited ${code}`}; the batch (${batch.records.length} records of source "${batch.source}") was not committed`,
          ),
        );
    });
  });
}
