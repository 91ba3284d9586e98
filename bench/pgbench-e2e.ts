/**
 * End-to-end check with a real application's write load: pgbench (TPC-B-like) against a source,
 * Philotes killed with SIGKILL twice during the run, then the buffer compared with the source:
 * every pgbench_history insert stored once, and replaying account updates reproduces balances.
 *   npx tsx bench/pgbench-e2e.ts
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { destroyAllClusters, startCluster } from '../test/support/cluster.js';
import { PHILOTES_MAIN } from '../test/support/philotes.js';
import { pgbench } from './pg-tools.js';

async function main(): Promise<void> {
  const [source, buffer] = await Promise.all([startCluster(), startCluster()]);
  await Promise.all([source.createDatabase('app'), buffer.createDatabase('buffer')]);
  await pgbench(source, ['-i', '-s', '2', '-q']);
  const env = {
    PATH: process.env['PATH'] ?? '',
    PHILOTES_CDC_SOURCE_URL: source.url('app'),
    PHILOTES_BUFFER_URL: buffer.url('buffer'),
    PHILOTES_CDC_SOURCE_ID: 'pgbench',
    PHILOTES_METRICS_PORT: '0',
    PHILOTES_CDC_CHECKPOINT_INTERVAL: '1s',
    PHILOTES_LOG_LEVEL: 'warn',
    // pgbench_history has no key and is insert-only: published as it is.
    PHILOTES_CDC_KEYLESS_TABLES: 'accept',
  };
  const start = (): ChildProcess =>
    spawn(process.execPath, [PHILOTES_MAIN], { env, stdio: ['ignore', 'ignore', 'inherit'] });
  let philotes = start();
  for (;;) {
    const rows = await source.query<{ active: boolean }>(
      `SELECT active FROM pg_replication_slots`,
      [],
      'app',
    );
    if (rows[0]?.active) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const load = pgbench(source, ['-c', '4', '-j', '2', '-T', '12']);
  for (let i = 0; i < 2; i++) {
    await new Promise((r) => setTimeout(r, 4000));
    philotes.kill('SIGKILL');
    await new Promise((r) => philotes.once('exit', r));
    philotes = start();
  }
  await load;
  const [{ lsn }] = (await source.query<{ lsn: string }>(
    'SELECT pg_current_wal_lsn()::text AS lsn',
    [],
    'app',
  )) as [{ lsn: string }];
  for (;;) {
    const rows = await source.query<{ ok: boolean }>(
      `SELECT confirmed_flush_lsn >= $1::pg_lsn AS ok FROM pg_replication_slots`,
      [lsn],
      'app',
    );
    if (rows[0]?.ok) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  philotes.kill('SIGTERM');
  const code = await new Promise((r) => philotes.once('exit', r));
  const [history] = await source.query<{ n: number }>(
    'SELECT count(*)::int AS n FROM pgbench_history',
    [],
    'app',
  );
  const [events] = await buffer.query<{ n: number; distinct_keys: number }>(
    `SELECT count(*)::int AS n, count(DISTINCT after)::int AS distinct_keys FROM cdc_events WHERE table_name = 'pgbench_history' AND operation = 'INSERT'`,
    [],
    'buffer',
  );
  // Replay balances: the last UPDATE event per account carries its final balance.
  const [balances] = await buffer.query<{ sum: string }>(
    `SELECT coalesce(sum((after->>'abalance')::bigint), 0)::text AS sum FROM (
       SELECT DISTINCT ON (after->>'aid') after FROM cdc_events WHERE table_name = 'pgbench_accounts' AND operation = 'UPDATE'
        ORDER BY after->>'aid', lsn DESC, seq DESC) t`,
    [],
    'buffer',
  );
  const [sourceBalances] = await source.query<{ sum: string }>(
    'SELECT sum(abalance)::text AS sum FROM pgbench_accounts',
    [],
    'app',
  );
  const [dups] = await buffer.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM (SELECT lsn, seq FROM cdc_events GROUP BY 1, 2 HAVING count(*) > 1) d`,
    [],
    'buffer',
  );
  console.log(
    JSON.stringify({
      exitCode: code,
      historyRows: history!.n,
      historyEvents: events!.n,
      sourceBalanceSum: sourceBalances!.sum,
      replayedBalanceSum: balances!.sum,
      duplicateKeys: dups!.n,
    }),
  );
  if (history!.n !== events!.n) {
    // Which history rows differ: compare (aid, tid, delta, mtime) multisets.
    const src = await source.query<{ k: string }>(
      `SELECT concat_ws(',', tid, bid, aid, delta, to_char(mtime, 'HH24:MI:SS.US')) AS k FROM pgbench_history`,
      [],
      'app',
    );
    const ev = await buffer.query<{ k: string; lsn: string; seq: number; xid: string }>(
      `SELECT concat_ws(',', after->>'tid', after->>'bid', after->>'aid', after->>'delta', substr(after->>'mtime', 12)) AS k, lsn::text, seq, xid::text FROM cdc_events WHERE table_name='pgbench_history' AND operation = 'INSERT'`,
      [],
      'buffer',
    );
    const count = new Map<string, number>();
    for (const r of src) count.set(r.k, (count.get(r.k) ?? 0) + 1);
    for (const r of ev) {
      const c = count.get(r.k) ?? 0;
      if (c === 0) {
        console.log('extra event', r);
        const all = await buffer.query(
          `SELECT lsn::text, seq, xid, operation, table_name, after FROM cdc_events WHERE xid = $1 ORDER BY cdc_events.lsn, seq`,
          [r.xid],
          'buffer',
        );
        console.log(JSON.stringify(all, null, 1));
        const cp = await buffer.query(`SELECT * FROM cdc_checkpoints`, [], 'buffer');
        console.log(JSON.stringify(cp));
      } else count.set(r.k, c - 1);
    }
    for (const [k, c] of count) if (c > 0) console.log('missing', k, c);
  }
  await Promise.all([source.destroy(), buffer.destroy()]);
}

main()
  .catch((e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  })
  .finally(() => destroyAllClusters());
