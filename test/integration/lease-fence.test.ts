/**
 * The lease fence at the level of the buffer's SQL (src/buffer/leases.ts, the argument in
 * docs/design/leases.md): what it rests on, each step asserted on a real server. A takeover
 * waits for a fenced transaction in flight and every later store of the old epoch fails; a
 * renewal never waits; a frozen owner's open transaction is ended by the member that takes over.
 */
import { hostname } from 'node:os';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  BufferStore,
  FencedError,
  LeaseBook,
  newMemberId,
  type HeldLease,
} from '../../src/buffer/store.js';
import { bufferApplicationName, type Member } from '../../src/buffer/leases.js';
import type { ConnectionConfig } from '../../src/common/config.js';
import { createLogger } from '../../src/common/logger.js';
import { startCluster, type Cluster } from '../support/cluster.js';
import { connectionOf } from '../support/fixture.js';
import { waitFor } from '../support/poll.js';

const TTL_MS = 60_000;
const log = createLogger('silent');

describe('the lease fence', () => {
  let cluster: Cluster;
  let conn: ConnectionConfig;
  const stores: BufferStore[] = [];
  const clients: pg.Client[] = [];

  /**
   * A member with its own store (and so its own, named, buffer sessions), fencing its stores
   * with the leases it was given to `hold` (the lease keeper's part).
   */
  async function member(): Promise<{
    member: Member;
    store: BufferStore;
    hold: (lease: HeldLease) => void;
  }> {
    const id = newMemberId(hostname(), process.pid);
    const store = await BufferStore.open(conn, log, 3, id);
    stores.push(store);
    const held = new Map<string, HeldLease>();
    store.book = new LeaseBook(id, (source) => held.get(source));
    const m: Member = { id, role: 'capture', host: hostname(), pid: process.pid, version: 'test' };
    await store.leases.renewLeases(m, TTL_MS, 0);
    return { member: m, store, hold: (lease) => held.set(lease.sourceId, lease) };
  }

  /** A session of `memberId`'s own, as a transaction it left open would be. */
  async function sessionOf(memberId: string): Promise<pg.Client> {
    const client = new pg.Client({
      connectionString: cluster.url('buffer'),
      application_name: bufferApplicationName(memberId),
    });
    client.on('error', () => undefined); // terminated on purpose below
    await client.connect();
    clients.push(client);
    return client;
  }

  const expire = (sourceId: string) =>
    cluster.query(
      `UPDATE cdc_leases SET expires_at = now() - interval '1 second' WHERE source_id = $1`,
      [sourceId],
      'buffer',
    );

  beforeAll(async () => {
    cluster = await startCluster();
    await cluster.createDatabase('buffer');
    conn = connectionOf(cluster, 'buffer');
  });

  afterAll(async () => {
    for (const c of clients) await c.end().catch(() => undefined);
    for (const s of stores) await s.close().catch(() => undefined);
    await cluster?.destroy();
  });

  it('lets a takeover wait for the old epoch in flight, then refuses the old epoch', async () => {
    const a = await member();
    const b = await member();
    const first = await a.store.leases.acquireLease(a.member.id, 'src_wait', TTL_MS);
    expect(first.lease).not.toBeNull();
    a.hold(first.lease!);
    // Another live member holds it: refused without waiting.
    expect((await b.store.leases.acquireLease(b.member.id, 'src_wait', TTL_MS)).lease).toBeNull();

    // A's store in flight: fenced, then paused before COMMIT.
    const inFlight = await sessionOf(a.member.id);
    await inFlight.query(
      `BEGIN; ${a.store.book!.fence(inFlight, ['src_wait'])}; INSERT INTO cdc_gaps (source_id, slot_name, from_lsn, to_lsn, reason) VALUES ('src_wait', 's', '0/1', '0/2', 'test')`,
    );
    // A renewal (expires_at only) does not wait for it.
    const renewed = await a.store.leases.renewLeases(a.member, TTL_MS, 0);
    expect(renewed.held.map((l) => l.sourceId)).toContain('src_wait');

    await expire('src_wait');
    // The takeover waits for the row lock (1 s at most per attempt)...
    const waiting = await b.store.leases.acquireLease(b.member.id, 'src_wait', TTL_MS);
    // ...and, the owner's lease having expired, ended its open transaction: nothing of it lands.
    expect(waiting).toEqual({ lease: null, heldBy: a.member.id, expiresInMs: null, terminated: 1 });
    expect(
      await cluster.query(`SELECT 1 FROM cdc_gaps WHERE source_id = 'src_wait'`, [], 'buffer'),
    ).toEqual([]);
    const taken = await b.store.leases.acquireLease(b.member.id, 'src_wait', TTL_MS);
    expect(taken.lease?.epoch).toBe(String(BigInt(first.lease!.epoch) + 1n));

    // Every store of A's epoch now fails inside its transaction.
    await expect(
      a.store.recordConfirmable('src_wait', 's', '0/10', undefined, undefined),
    ).rejects.toBeInstanceOf(FencedError);
    const history = await cluster.query<{ event: string; epoch: string }>(
      `SELECT event, epoch::text FROM cdc_lease_history WHERE source_id = 'src_wait' ORDER BY id`,
      [],
      'buffer',
    );
    expect(history.map((h) => h.event)).toEqual(['acquired', 'taken_over']);
  });

  it('commits a fenced transaction that began before the takeover, and then the takeover', async () => {
    const a = await member();
    const b = await member();
    const first = await a.store.leases.acquireLease(a.member.id, 'src_commit', TTL_MS);
    a.hold(first.lease!);
    const inFlight = await sessionOf(a.member.id);
    await inFlight.query(
      `BEGIN; ${a.store.book!.fence(inFlight, ['src_commit'])}; INSERT INTO cdc_gaps (source_id, slot_name, from_lsn, to_lsn, reason) VALUES ('src_commit', 's', '0/1', '0/2', 'test')`,
    );
    await expire('src_commit');
    // B's takeover, on a connection of its own, blocks on A's transaction...
    const takeover = new pg.Client({ connectionString: cluster.url('buffer') });
    clients.push(takeover);
    await takeover.connect();
    const blocked = takeover.query(
      `UPDATE cdc_leases SET owner = $1, epoch = epoch + 1 WHERE source_id = 'src_commit' RETURNING epoch::text`,
      [b.member.id],
    );
    await waitFor(
      async () =>
        (
          await cluster.query<{ n: number }>(
            `SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = 'buffer' AND wait_event_type = 'Lock'`,
            [],
            'buffer',
          )
        )[0]!.n === 1,
      { what: 'the takeover to wait for the fenced transaction', timeoutMs: 10_000 },
    );
    // ...until A commits: A's rows land (they were fenced under a lease A held), then B's epoch.
    await inFlight.query('COMMIT');
    const [row] = (await blocked).rows as Array<{ epoch: string }>;
    expect(row!.epoch).toBe(String(BigInt(first.lease!.epoch) + 1n));
    expect(
      await cluster.query(`SELECT 1 FROM cdc_gaps WHERE source_id = 'src_commit'`, [], 'buffer'),
    ).toHaveLength(1);
    // And A's next transaction is refused.
    await expect(
      a.store.recordConfirmable('src_commit', 's', '0/10', undefined, undefined),
    ).rejects.toBeInstanceOf(FencedError);
  });

  it('fences a coalesced group as a whole: one stale part rolls the others back', async () => {
    const a = await member();
    const b = await member();
    for (const id of ['src_g1', 'src_g2'])
      a.hold((await a.store.leases.acquireLease(a.member.id, id, TTL_MS)).lease!);
    await expire('src_g2');
    expect((await b.store.leases.acquireLease(b.member.id, 'src_g2', TTL_MS)).lease).not.toBeNull();
    const client = await sessionOf(a.member.id);
    await expect(
      client.query(`BEGIN; ${a.store.book!.fence(client, ['src_g1', 'src_g2'])}`),
    ).rejects.toMatchObject({ code: 'PH001', detail: 'src_g2' });
    await client.query('ROLLBACK');
    // A lease the book does not hold is refused before the transaction begins.
    expect(() => a.store.book!.fence(client, ['src_never'])).toThrow(FencedError);
  });

  it('gives a released lease to the next member at once, with a new epoch', async () => {
    const a = await member();
    const b = await member();
    const first = (await a.store.leases.acquireLease(a.member.id, 'src_release', TTL_MS)).lease!;
    await a.store.leases.releaseLease(a.member.id, first);
    const next = (await b.store.leases.acquireLease(b.member.id, 'src_release', TTL_MS)).lease;
    expect(next?.epoch).toBe(String(BigInt(first.epoch) + 1n));
    const lease = await b.store.readLease('src_release');
    expect(lease).toMatchObject({ owner: b.member.id, host: hostname(), pid: process.pid });
  });
});
