/**
 * The replication connection's CopyData framing (takeOverCopyData): however the socket splits
 * the bytes, every CopyData payload comes out whole and in order, and every other message goes
 * to pg's own parser byte for byte, in order with them.
 */
import { EventEmitter } from 'node:events';
import { describe, expect, it } from 'vitest';
import { takeOverCopyData } from '../../workers/replication-stream.js';

function message(type: string, body: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head[0] = type.charCodeAt(0);
  head.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([head, body]);
}

function run(stream: Buffer, cut: (i: number) => number[]) {
  const socket = new EventEmitter();
  const connection = Object.assign(new EventEmitter(), { stream: socket });
  const seen: string[] = [];
  socket.on('data', (b: Buffer) => seen.push(`pg:${b.toString('latin1')}`));
  takeOverCopyData(connection, (payload, owned) =>
    seen.push(`copy${owned ? '(owned)' : ''}:${payload.toString('latin1')}`),
  );
  let at = 0;
  for (const end of [...cut(stream.length), stream.length]) {
    if (end > at) socket.emit('data', stream.subarray(at, end));
    at = Math.max(at, end);
  }
  return seen.map((s) => s.replace('(owned)', ''));
}

describe('CopyData framing ahead of pg', () => {
  const big = Buffer.alloc(70_000, 'z');
  const parts = [
    message('d', Buffer.from('w-first')),
    message('N', Buffer.from('notice body')),
    message('d', big),
    message('d', Buffer.alloc(0)),
    message('d', Buffer.from('k')),
    message('E', Buffer.from('error body')),
  ];
  const stream = Buffer.concat(parts);
  const expected = [
    'copy:w-first',
    `pg:${parts[1]!.toString('latin1')}`,
    `copy:${big.toString('latin1')}`,
    'copy:',
    'copy:k',
    `pg:${parts[5]!.toString('latin1')}`,
  ];

  it('in one read', () => {
    expect(run(stream, () => [])).toEqual(expected);
  });

  it('split at every byte of the headers and small bodies, and inside the large one', () => {
    for (let cut = 1; cut < 40; cut++) {
      expect(
        run(stream, () => [cut]),
        `cut at ${cut}`,
      ).toEqual(expected);
    }
    expect(run(stream, () => [1, 2, 3, 50, 30_000, 60_000, 70_030])).toEqual(expected);
  });

  it('one byte per read', () => {
    expect(run(stream, (n) => Array.from({ length: n }, (_, i) => i + 1))).toEqual(expected);
  });

  it('a payload assembled across reads is its own memory', () => {
    const socket = new EventEmitter();
    const connection = Object.assign(new EventEmitter(), { stream: socket });
    socket.on('data', () => undefined);
    const owned: boolean[] = [];
    takeOverCopyData(connection, (_p, o) => owned.push(o));
    const m = message('d', big);
    socket.emit('data', m.subarray(0, 100));
    socket.emit('data', m.subarray(100));
    socket.emit('data', message('d', Buffer.from('x')));
    expect(owned).toEqual([true, false]);
  });
});
