/** /metrics for Prometheus and /healthz for orchestrators. */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from './logger.js';
import type { Metrics } from './metrics.js';

export interface HealthReport {
  readonly healthy: boolean;
  readonly sources: ReadonlyArray<Record<string, unknown>>;
}

export async function startHttpServer(
  host: string,
  port: number,
  metrics: Metrics,
  health: () => HealthReport,
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
    if (path === '/healthz') {
      const report = health();
      res
        .writeHead(report.healthy ? 200 : 503, { 'content-type': 'application/json' })
        .end(
          JSON.stringify({ status: report.healthy ? 'ok' : 'unhealthy', sources: report.sources }),
        );
      return;
    }
    res
      .writeHead(404, { 'content-type': 'text/plain' })
      .end('not found: try /metrics or /healthz\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address() as AddressInfo;
  log.info({ host: address.address, port: address.port }, 'metrics and health endpoint listening');
  return server;
}
