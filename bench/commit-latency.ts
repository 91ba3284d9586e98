/**
 * Commit-to-buffer latency from what landed: for each source transaction, the commit time of the
 * buffer transaction that stored it (the buffer cluster runs with track_commit_timestamp on)
 * minus its source commit time. Source and buffer share this machine's clock.
 */
import type { Cluster } from '../test/support/cluster.js';

export interface LatencyStats {
  transactions: number;
  p50Ms: number;
  p95Ms: number;
  p99Ms: number;
  maxMs: number;
}

/** Over the transactions of `table` committed after the first two seconds (the warm-up). */
export async function commitLatency(
  buffer: Cluster,
  database: string,
  table: string,
): Promise<LatencyStats> {
  const [stats] = await buffer.query<{
    n: number;
    p50: number;
    p95: number;
    p99: number;
    max: number;
  }>(
    `WITH t AS (SELECT min(pg_xact_commit_timestamp(xmin)) AS stored,
                       min(committed_at) AS committed
                  FROM cdc_events WHERE table_name = $1 GROUP BY source_id, lsn),
          w AS (SELECT extract(epoch FROM stored - committed) * 1000 AS ms FROM t
                 WHERE committed >= (SELECT min(committed) FROM t) + interval '2 seconds')
     SELECT count(*)::int AS n,
            percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
            percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95,
            percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
            max(ms) AS max
       FROM w`,
    [table],
    database,
  );
  const round = (n: unknown) => Math.round(Number(n) * 1000) / 1000;
  return {
    transactions: stats!.n,
    p50Ms: round(stats!.p50),
    p95Ms: round(stats!.p95),
    p99Ms: round(stats!.p99),
    maxMs: round(stats!.max),
  };
}
