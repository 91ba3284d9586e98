/**
 * Whether a server is still the history the buffer holds, table-driven (src/common/source-history.ts;
 * the argument is docs/design/source-history.md). The faults test history.test.ts runs the real
 * cases (a restored data directory, a promoted standby) on servers.
 */
import { describe, expect, it } from 'vitest';
import { parseLsn } from '../../src/common/lsn.js';
import {
  confirmedOnHistory,
  findDivergence,
  fullXid,
  parseTimelineHistory,
  xidAssigned,
  type ServerHistory,
  type StoredHistory,
} from '../../src/common/source-history.js';

const L = parseLsn;
const ID = { systemId: '7300000000000000001', timeline: 1, databaseOid: 16384 };

function stored(overrides: Partial<StoredHistory> = {}): StoredHistory {
  return {
    identity: ID,
    checkpointLsn: L('0/5000'),
    confirmedLsn: L('0/5000'),
    checkpointXid: 1000,
    ...overrides,
  };
}

function server(overrides: Partial<ServerHistory> = {}): ServerHistory {
  return { identity: ID, walLsn: L('0/9000'), nextXid: 1200n, forks: null, ...overrides };
}

describe('parseTimelineHistory', () => {
  it('reads each ancestor timeline and where it was left, ignoring comments and reasons', () => {
    const content = [
      '# a comment',
      '1\t0/3000158\tno recovery target specified',
      '',
      '2\t1/A000000\tbefore 2026-01-01 00:00:00+00',
      '',
    ].join('\n');
    expect(parseTimelineHistory(content)).toEqual(
      new Map([
        [1, L('0/3000158')],
        [2, L('1/A000000')],
      ]),
    );
  });
});

describe('fullXid and xidAssigned', () => {
  it('makes a stream xid 64-bit from a nearby reference, across an epoch boundary', () => {
    expect(fullXid(1000, 1200n)).toBe(1000n);
    expect(fullXid(1300, 1200n)).toBe(1300n);
    const epoch1 = 1n << 32n;
    // Assigned just before the epoch turned; the reference is just after.
    expect(fullXid(0xfffffff0, epoch1 + 5n)).toBe(epoch1 - 16n);
    // Assigned just after; the reference just before.
    expect(fullXid(3, epoch1 - 2n)).toBe(epoch1 + 3n);
  });

  it('compares 64-bit xids as numbers: a server far on (past 2^31 xids) has assigned it', () => {
    expect(xidAssigned(1000, 1001n)).toBe(true);
    expect(xidAssigned(1000, 1000n)).toBe(false); // the next one: not assigned yet
    expect(xidAssigned(1001, 1000n)).toBe(false);
    expect(xidAssigned(1000, 1000n + 3n * (1n << 31n))).toBe(true);
  });
});

describe('findDivergence', () => {
  const cases: Array<{
    name: string;
    stored: StoredHistory;
    server: ServerHistory;
    expected: ReturnType<typeof findDivergence>;
  }> = [
    { name: 'the same history, further on', stored: stored(), server: server(), expected: null },
    {
      name: 'nothing recorded yet (an earlier version): trusted, then recorded',
      stored: stored({ identity: null }),
      server: server({ identity: { ...ID, systemId: '1' } }),
      expected: null,
    },
    {
      name: 'another system identifier: replaced, the fork at the new WAL end',
      stored: stored(),
      server: server({ identity: { ...ID, systemId: '7399' }, walLsn: L('0/1000') }),
      expected: {
        kind: 'replaced',
        why: 'system_identifier',
        forkLsn: L('0/1000'),
        forkKnown: false,
      },
    },
    {
      name: 'another database oid: replaced',
      stored: stored(),
      server: server({ identity: { ...ID, databaseOid: 16999 } }),
      expected: { kind: 'replaced', why: 'database', forkLsn: L('0/5000'), forkKnown: false },
    },
    {
      name: 'a new timeline that left ours before the checkpoint: diverged at the fork',
      stored: stored(),
      server: server({ identity: { ...ID, timeline: 2 }, forks: new Map([[1, L('0/4000')]]) }),
      expected: { kind: 'diverged', why: 'timeline', forkLsn: L('0/4000'), forkKnown: true },
    },
    {
      name: 'a new timeline that left ours at or after the checkpoint: the same history',
      stored: stored(),
      server: server({ identity: { ...ID, timeline: 2 }, forks: new Map([[1, L('0/5000')]]) }),
      expected: null,
    },
    {
      name: 'a timeline whose history lacks ours (a sibling branch): diverged, fork unknown',
      stored: stored({ identity: { ...ID, timeline: 2 } }),
      server: server({ identity: { ...ID, timeline: 3 }, forks: new Map([[1, L('0/4000')]]) }),
      expected: { kind: 'diverged', why: 'timeline', forkLsn: L('0/5000'), forkKnown: false },
    },
    {
      name: 'an older timeline than ours (restored from before a promotion)',
      stored: stored({ identity: { ...ID, timeline: 2 } }),
      server: server({ walLsn: L('0/4800') }),
      expected: { kind: 'diverged', why: 'timeline', forkLsn: L('0/4800'), forkKnown: false },
    },
    {
      name: 'WAL behind the checkpoint (a restored disk snapshot)',
      stored: stored(),
      server: server({ walLsn: L('0/4800') }),
      expected: { kind: 'diverged', why: 'wal_behind', forkLsn: L('0/4800'), forkKnown: false },
    },
    {
      name: 'past the checkpoint in WAL, but the last stored xid never assigned',
      stored: stored(),
      server: server({ nextXid: 990n }),
      expected: { kind: 'diverged', why: 'xid_behind', forkLsn: L('0/5000'), forkKnown: false },
    },
    {
      name: 'no stored xid (a checkpoint a reset set): positions only',
      stored: stored({ checkpointXid: null }),
      server: server({ nextXid: 3n }),
      expected: null,
    },
  ];
  for (const c of cases) {
    it(c.name, () => {
      expect(findDivergence(c.stored, c.server)).toEqual(c.expected);
    });
  }
});

describe('confirmedOnHistory', () => {
  it('clamps an idle confirmation past a timeline fork to the fork', () => {
    const s = stored({ confirmedLsn: L('0/8000') });
    const forked = server({ identity: { ...ID, timeline: 2 }, forks: new Map([[1, L('0/6000')]]) });
    expect(confirmedOnHistory(s, forked)).toBe(L('0/6000'));
    expect(confirmedOnHistory(s, server())).toBe(L('0/8000'));
  });
});
