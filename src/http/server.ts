/**
 * The HTTP endpoint: /metrics for Prometheus, /healthz for liveness, /readyz for readiness, and
 * the status page at / for people.
 *
 * Liveness and readiness answer different questions, the way orchestrators use them. /healthz:
 * does this process work (its event loop answers, its supervisor runs)? A remote database being
 * down is no reason to restart Philotes, so it stays 200. /readyz: is every source capturing? It
 * turns 503 once any source has not streamed for longer than the readiness grace period, however
 * many retries it made meanwhile, and says per source why.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../common/logger.js';
import type { Metrics } from './metrics.js';

export interface Probe {
  readonly ok: boolean;
  readonly body: Record<string, unknown>;
}

export interface Probes {
  liveness(): Probe;
  readiness(): Probe;
  /** The status page's HTML (status-page.ts). */
  page(): string;
}

export async function startHttpServer(
  host: string,
  port: number,
  metrics: Metrics,
  probes: Probes,
  log: Logger,
): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (path === '/metrics') {
      metrics.registry.metrics().then(
        (body) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(body),
        (error: unknown) => {
          log.error({ err: error }, 'collecting metrics failed');
          res.writeHead(500).end();
        },
      );
      return;
    }
    if (path === '/') {
      res
        .writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' })
        .end(probes.page());
      return;
    }
    const probe =
      path === '/healthz' ? probes.liveness() : path === '/readyz' ? probes.readiness() : null;
    if (probe !== null) {
      res
        .writeHead(probe.ok ? 200 : 503, {
          'content-type': 'application/json',
          'cache-control': 'no-store',
        })
        .end(JSON.stringify(probe.body));
      return;
    }
    res
      .writeHead(404, { 'content-type': 'text/plain' })
      .end('not found: try /, /metrics, /healthz or /readyz\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address() as AddressInfo;
  log.info(
    { host: address.address, port: address.port },
    'status page, metrics and health endpoints listening (/, /metrics, /healthz, /readyz)',
  );
  return server;
}
