/**
 * The rules that keep a gap from passing silently, table-driven: whether a slot can still deliver
 * everything after the buffer's record, and where an event's primary key comes from.
 */
import { describe, expect, it } from 'vitest';
import type { SourceConfig } from '../../src/common/config.js';
import { isFatal } from '../../src/common/errors.js';
import { formatBytes, parseLsn } from '../../src/common/lsn.js';
import { findGap, gapError, slotVerdict, type SlotState } from '../../src/common/source-admin.js';
import type { FatalSourceError } from '../../src/common/errors.js';
import { explainSourceError, noticeGapError } from '../../workers/source-errors.js';
import { choosePrimaryKey } from '../../workers/catalog-resolver.js';

const L = parseLsn;

function slot(overrides: Partial<SlotState> = {}): SlotState {
  return {
    plugin: 'pgoutput',
    slotType: 'logical',
    database: 'app',
    active: false,
    activePid: null,
    walStatus: 'reserved',
    invalidationReason: null,
    confirmedFlushLsn: L('0/3000'),
    restartLsn: L('0/2000'),
    safeWalSize: null,
    failover: null,
    synced: null,
    ...overrides,
  };
}

const SOURCE: SourceConfig = {
  id: 'orders',
  connection: {
    host: 'db.internal',
    port: 5432,
    database: 'app',
    user: 'cdc',
    password: 'pw-never-shown',
    sslmode: 'prefer',
    sslRootCert: undefined,
  },
  slot: 'philotes_orders',
  publication: 'philotes_pub',
  tables: [],
  partitionRoot: true,
  messages: [],
  ddl: false,
  failover: false,
  protocol: null,
  snapshot: 'never',
  keylessTables: 'block',
  settings: {
    checkpointIntervalMs: 10_000,
    sourceTimeoutMs: 30_000,
    walSenderTimeoutMs: 15_000,
    batchMaxRows: 5000,
    batchMaxBytes: 4 * 1024 * 1024,
    batchMaxWaitMs: 0,
    maxInFlightBatches: 4,
    readerHeapLimitMb: 512,
    snapshotChunkRows: 10_000,
    snapshotParallelTables: 1,
  },
};

describe('findGap', () => {
  const now = L('0/9000');
  const cases: Array<{
    name: string;
    record: { checkpointLsn: bigint; confirmedLsn: bigint };
    slot: SlotState | null;
    expected: ReturnType<typeof findGap>;
  }> = [
    {
      name: 'slot behind the checkpoint (a final confirmation that did not arrive): no gap',
      record: { checkpointLsn: L('0/4000'), confirmedLsn: L('0/4000') },
      slot: slot({ confirmedFlushLsn: L('0/3000') }),
      expected: null,
    },
    {
      name: 'slot exactly at the checkpoint: no gap',
      record: { checkpointLsn: L('0/3000'), confirmedLsn: L('0/3000') },
      slot: slot(),
      expected: null,
    },
    {
      name: 'slot moved by our own recorded idle confirmation: no gap',
      record: { checkpointLsn: L('0/1000'), confirmedLsn: L('0/3000') },
      slot: slot({ confirmedFlushLsn: L('0/3000') }),
      expected: null,
    },
    {
      name: 'slot one byte past anything we recorded: advanced by someone else',
      record: { checkpointLsn: L('0/1000'), confirmedLsn: L('0/2FFF') },
      slot: slot({ confirmedFlushLsn: L('0/3000') }),
      expected: { reason: 'slot_advanced', fromLsn: L('0/2FFF'), toLsn: L('0/3000') },
    },
    {
      name: 'slot missing under a checkpoint',
      record: { checkpointLsn: L('0/1000'), confirmedLsn: L('0/1000') },
      slot: null,
      expected: { reason: 'slot_missing', fromLsn: L('0/1000'), toLsn: now },
    },
    {
      name: 'slot invalidated (wal_status lost)',
      record: { checkpointLsn: L('0/1000'), confirmedLsn: L('0/1800') },
      slot: slot({ walStatus: 'lost', confirmedFlushLsn: L('0/1000') }),
      expected: { reason: 'slot_invalidated', fromLsn: L('0/1800'), toLsn: now },
    },
    {
      name: 'slot invalidated with a reason (PostgreSQL 17+) even before wal_status says lost',
      record: { checkpointLsn: L('0/1000'), confirmedLsn: L('0/1000') },
      slot: slot({ walStatus: 'unreserved', invalidationReason: 'wal_removed' }),
      expected: { reason: 'slot_invalidated', fromLsn: L('0/1000'), toLsn: now },
    },
    {
      name: 'a 64-bit position past 4 GB compares as a number, not as text',
      record: { checkpointLsn: L('1/0'), confirmedLsn: L('1/0') },
      slot: slot({ confirmedFlushLsn: L('0/FFFFFFFF') }),
      expected: null,
    },
  ];
  for (const c of cases) {
    it(c.name, () => {
      expect(findGap(c.record, c.slot, now)).toEqual(c.expected);
    });
  }

  it('gapError says what happened, the positions, the size and the way out, and is fatal', () => {
    const error = gapError(
      SOURCE,
      { reason: 'slot_advanced', fromLsn: L('0/1000'), toLsn: L('0/101000') },
      slot({ confirmedFlushLsn: L('0/101000') }),
      L('0/1000'),
    );
    expect(isFatal(error)).toBe(true);
    expect(error.code).toBe('SLOT_ADVANCED');
    expect(error.message).toContain('0/1000');
    expect(error.message).toContain('0/101000');
    expect(error.message).toContain('1.0 MB');
    expect(error.message).toContain('reset-source --source orders --accept-gap');
    expect(error.message).not.toContain('pw-never-shown');
    expect(error.details).toMatchObject({ gapFromLsn: '0/1000', gapToLsn: '0/101000' });
  });

  it('formatBytes', () => {
    expect(formatBytes(0n)).toBe('0 B');
    expect(formatBytes(1023n)).toBe('1023 B');
    expect(formatBytes(1536n)).toBe('1.5 kB');
    expect(formatBytes(200n * 1024n * 1024n)).toBe('200 MB');
  });
});

describe('choosePrimaryKey', () => {
  const col = (name: string, key = false) => ({ name, key });
  const cases: Array<{
    name: string;
    identity: string;
    columns: Array<{ name: string; key: boolean }>;
    catalog: string[];
    expected: string[];
  }> = [
    {
      name: 'default identity: the stream flags are the key; the catalog gives its order',
      identity: 'd',
      columns: [col('a', true), col('b', true), col('c')],
      catalog: ['b', 'a'],
      expected: ['b', 'a'],
    },
    {
      name: 'default identity, key column renamed since: the stream wins',
      identity: 'd',
      columns: [col('id', true), col('a')],
      catalog: ['order id'],
      expected: ['id'],
    },
    {
      name: 'default identity, key dropped since: the stream still says id',
      identity: 'd',
      columns: [col('id', true), col('a')],
      catalog: [],
      expected: ['id'],
    },
    {
      name: 'default identity, key added since: no key at this point of the stream',
      identity: 'd',
      columns: [col('id'), col('a')],
      catalog: ['id'],
      expected: [],
    },
    {
      name: 'REPLICA IDENTITY FULL: the catalog key, when the stream has its columns',
      identity: 'f',
      columns: [col('id', true), col('a', true)],
      catalog: ['id'],
      expected: ['id'],
    },
    {
      name: 'REPLICA IDENTITY FULL, key column renamed since: the identity columns stand in',
      identity: 'f',
      columns: [col('id', true), col('a', true)],
      catalog: ['order id'],
      expected: ['id', 'a'],
    },
    {
      name: 'REPLICA IDENTITY USING INDEX without a primary key: the index columns',
      identity: 'i',
      columns: [col('id'), col('code', true)],
      catalog: [],
      expected: ['code'],
    },
    {
      name: 'REPLICA IDENTITY NOTHING without a primary key: none',
      identity: 'n',
      columns: [col('id'), col('a')],
      catalog: [],
      expected: [],
    },
  ];
  for (const c of cases) {
    it(c.name, () => {
      expect(choosePrimaryKey(c.identity, c.columns, c.catalog).names).toEqual(c.expected);
    });
  }
});

describe('what the stream says that means a gap', () => {
  it("PostgreSQL 15's missing-publication error stops the source with the way out", () => {
    const error = Object.assign(new Error('publication "philotes_pub" does not exist'), {
      code: '42704',
      where:
        'slot "philotes_orders", output plugin "pgoutput", in the change callback, associated LSN 0/1922CC8',
    });
    const explained = explainSourceError(error, SOURCE) as FatalSourceError;
    expect(explained.code).toBe('PUBLICATION_MISSING');
    expect(explained.message).toContain('0/1922CC8');
    expect(explained.message).toContain('--skip-to-current');
    expect(isFatal(explained)).toBe(true);
  });

  it("PostgreSQL 18's skipped-publication warning is a gap; other warnings are not", () => {
    const gap = noticeGapError(
      { severity: 'WARNING', code: '55000', message: 'skipped loading publication "philotes_pub"' },
      SOURCE,
    );
    expect(gap?.code).toBe('PUBLICATION_MISSING');
    expect(
      noticeGapError({ severity: 'WARNING', code: '55000', message: 'about "other_pub"' }, SOURCE),
    ).toBeNull();
    expect(noticeGapError({ severity: 'WARNING', code: '01000', message: 'x' }, SOURCE)).toBeNull();
  });

  it('removed WAL is a gap; an error about another publication passes through', () => {
    const removed = explainSourceError(
      Object.assign(
        new Error('requested WAL segment 000000010000000000000001 has already been removed'),
        {
          code: '58P01',
        },
      ),
      SOURCE,
    ) as FatalSourceError;
    expect(removed.code).toBe('WAL_REMOVED');
    const other = Object.assign(new Error('publication "other" does not exist'), { code: '42704' });
    expect(explainSourceError(other, SOURCE)).toBe(other);
  });
});

describe('slotVerdict: the one slot and continuity verdict the reader throws and check prints', () => {
  const record = { checkpointLsn: L('0/3000'), confirmedLsn: L('0/3000') };
  const WAL = L('0/9000');

  it('a slot that can deliver everything after the record, or none yet for a new source: no problem', () => {
    expect(slotVerdict(SOURCE, slot(), WAL, record)).toBeNull();
    expect(slotVerdict(SOURCE, null, WAL, null)).toBeNull();
    expect(slotVerdict(SOURCE, slot({ confirmedFlushLsn: L('0/8000') }), WAL, null)).toBeNull();
  });

  it('a slot of the wrong kind or database, whatever the buffer holds', () => {
    for (const rec of [null, record]) {
      expect(slotVerdict(SOURCE, slot({ slotType: 'physical' }), WAL, rec)?.error.code).toBe(
        'SLOT_WRONG_KIND',
      );
      expect(slotVerdict(SOURCE, slot({ plugin: 'wal2json' }), WAL, rec)?.error.code).toBe(
        'SLOT_WRONG_KIND',
      );
      expect(slotVerdict(SOURCE, slot({ database: 'other' }), WAL, rec)?.error.code).toBe(
        'SLOT_WRONG_DATABASE',
      );
    }
  });

  it('under a checkpoint: missing, invalidated and advanced are the gaps findGap finds, with their positions', () => {
    const cases: Array<[SlotState | null, string]> = [
      [null, 'SLOT_MISSING'],
      [slot({ walStatus: 'lost' }), 'SLOT_INVALIDATED'],
      [slot({ confirmedFlushLsn: L('0/5000') }), 'SLOT_ADVANCED'],
    ];
    for (const [s, code] of cases) {
      const problem = slotVerdict(SOURCE, s, WAL, record);
      expect(problem?.error.code).toBe(code);
      expect(problem?.error.details?.['gapFromLsn']).toBe('0/3000');
      // What happened, without the way out: check prints the way out as its fix.
      expect(problem!.error.message.startsWith(problem!.what)).toBe(true);
      expect(problem!.what).not.toContain('reset-source');
      expect(problem!.error.message).toContain('reset-source --source orders --accept-gap');
    }
  });

  it('an invalidated slot with no checkpoint: nothing stored is at stake, and it says so', () => {
    const problem = slotVerdict(SOURCE, slot({ walStatus: 'lost' }), WAL, null);
    expect(problem?.error.code).toBe('SLOT_INVALIDATED');
    expect(problem?.error.message).toContain('nothing stored is at stake');
  });
});
