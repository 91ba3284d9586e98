/**
 * The confirmation rule on its own: never past what is durable, an idle WAL end only while
 * nothing is pending or in flight, and nothing past the checkpoint before the buffer records it.
 */
import { describe, expect, it } from 'vitest';
import { Confirmations } from '../../workers/confirmations.js';

const START = 1_000n;

/**
 * A reader at START whose buffer already allows confirming up to `recorded`; `commitRead` stands
 * for the batch builder, which owns the position of the last commit read.
 */
function rule(recorded = START): Confirmations & { commitRead(endLsn: number): void } {
  const commits = { lastCommitEnd: 0 };
  return Object.assign(new Confirmations(START, recorded, commits), {
    commitRead: (endLsn: number) => (commits.lastCommitEnd = endLsn),
  });
}

describe('Confirmations', () => {
  it('confirms nothing before anything is durable', () => {
    const c = rule();
    c.sent();
    c.commitRead(1_500);
    expect(c.next(false, false)).toEqual({ confirm: null, record: null });
    expect(c.confirmed).toBe(START);
  });

  it('confirms a stored checkpoint once the supervisor reports it durable', () => {
    const c = rule();
    const seq = c.sent();
    c.commitRead(1_500);
    c.durable(seq, 1_500n);
    expect(c.next(true, false)).toEqual({ confirm: 1_500n, record: null });
    // Asked again with nothing new: nothing to send.
    expect(c.next(true, false)).toEqual({ confirm: null, record: null });
  });

  it('a durable report without a checkpoint (a transaction still open) moves nothing', () => {
    const c = rule();
    const seq = c.sent();
    c.durable(seq, null);
    expect(c.next(false, false).confirm).toBeNull();
  });

  it('an idle WAL end is confirmed only once recorded, and recorded only once asked', () => {
    const c = rule();
    c.keepalive(5_000n, true);
    expect(c.next(true, false)).toEqual({ confirm: null, record: 5_000n });
    expect(c.next(true, false)).toEqual({ confirm: null, record: null }); // asked already
    c.recorded(5_000n);
    expect(c.next(true, false)).toEqual({ confirm: 5_000n, record: null });
  });

  it('a WAL end recorded earlier (by a previous run) is confirmed without asking again', () => {
    const c = rule(9_000n);
    c.keepalive(5_000n, true);
    expect(c.next(true, false)).toEqual({ confirm: 5_000n, record: null });
  });

  it('a keepalive while a batch is in flight is not idle, even when the reader has nothing pending', () => {
    const c = rule(1_000_000n);
    const seq = c.sent();
    c.keepalive(5_000n, true);
    expect(c.next(true, false).confirm).toBeNull();
    c.durable(seq, null);
    // That keepalive never counted; the next one does.
    expect(c.next(true, false).confirm).toBeNull();
    c.keepalive(6_000n, true);
    expect(c.next(true, false).confirm).toBe(6_000n);
  });

  it('the commit-only batch: a transaction whose events went out earlier is never passed before its commit is stored', () => {
    // Its events went out in batch 1 and were stored without a checkpoint; its commit is read
    // into an empty batch that has not been sent yet, so the reader is not idle.
    const c = rule(1_000_000n);
    const events = c.sent();
    c.durable(events, null);
    c.commitRead(2_000);
    c.keepalive(3_000n, false);
    expect(c.next(false, false).confirm).toBeNull();
    // The commit goes out alone; until it is durable, nothing past the start is confirmed.
    const commit = c.sent();
    c.keepalive(3_000n, true);
    expect(c.next(true, false).confirm).toBeNull();
    c.durable(commit, 2_000n);
    expect(c.next(true, false).confirm).toBe(2_000n);
    c.keepalive(3_000n, true);
    expect(c.next(true, false).confirm).toBe(3_000n);
  });

  it('while stopping, an idle WAL end seen earlier may be confirmed once everything sent is durable', () => {
    const c = rule(1_000_000n);
    c.keepalive(6_000n, true);
    const seq = c.sent(); // a change read after that keepalive; then the stop
    c.durable(seq, null);
    expect(c.safeLsn(false, false)).toBe(START);
    expect(c.safeLsn(false, true)).toBe(6_000n);
  });

  it('never confirms backwards', () => {
    const c = rule();
    const a = c.sent();
    c.durable(a, 3_000n);
    expect(c.next(true, false).confirm).toBe(3_000n);
    c.durable(a, 2_000n);
    expect(c.next(true, false).confirm).toBeNull();
    expect(c.confirmed).toBe(3_000n);
  });

  it('knows how far the server WAL reaches and what is in flight', () => {
    const c = rule();
    c.keepalive(2_000n, false);
    c.commitRead(2_500);
    expect(c.serverWalEnd).toBe(2_500n);
    c.sent();
    c.sent();
    expect(c.inFlight).toBe(2);
    c.durable(1, null);
    expect(c.inFlight).toBe(1);
    expect(c.allDurable).toBe(false);
  });
});
