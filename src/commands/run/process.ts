/**
 * The process after start-up: serves /metrics, /healthz and /readyz, opens the buffer (waiting
 * for it as long as waiting can help), and runs the supervisor until SIGTERM/SIGINT. Loaded by
 * main.ts once the reader threads are starting.
 */
import type http from 'node:http';
import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import type { ReaderThreads } from '../../supervisor/reader-pool.js';
import { ConfigError, loadConfig, type Config } from '../../common/config.js';
import { classifyBufferError, isFatal, passwordSource } from '../../common/errors.js';
import { die, EXIT_ERROR, EXIT_OK, EXIT_USAGE, oneLine } from '../../common/exit.js';
import { renderStatusPage, type FleetReport, type StatusPageData } from '../../http/status-page.js';
import { startHttpServer, type Probe } from '../../http/server.js';
import { createLogger, safeConnection, type Logger } from '../../common/logger.js';
import { Metrics } from '../../http/metrics.js';
import { backoffDelay, type SourceReport } from '../../supervisor/source-runner.js';
import { Supervisor } from '../../supervisor/supervisor.js';
import { BufferStore, newMemberId } from '../../buffer/store.js';

/** Backoff while the buffer is not there yet (compose, Kubernetes, a failover). */
const BUFFER_RETRY_MIN_MS = 500;
const BUFFER_RETRY_MAX_MS = 15_000;

/** Why the buffer is not open yet, for /readyz and the logs. */
interface BufferWait {
  problem: string | null;
  attempts: number;
  nextAttemptAt: number | null;
}

/**
 * Opens the buffer. Waiting can fix an unreachable, starting, read-only or full buffer, or one
 * out of connections: those are retried, each with its own message, until it works or a signal
 * stops us. Bad credentials, a missing database or privilege cannot: they throw at once.
 */
async function openBuffer(
  config: Config,
  memberId: string,
  log: Logger,
  wait: BufferWait,
  signal: AbortSignal,
): Promise<BufferStore> {
  log.info({ buffer: safeConnection(config.buffer) }, 'connecting to buffer database');
  for (let attempt = 1; ; attempt++) {
    try {
      // The writers' connections, and a few for start-ups, confirmable positions and gaps.
      const store = await BufferStore.open(
        config.buffer,
        log,
        config.commitWriters + 3,
        memberId,
        config,
      );
      if (attempt > 1) log.info({ attempts: attempt }, 'buffer database open');
      return store;
    } catch (error) {
      const kind = classifyBufferError(error);
      if (!kind.retry || signal.aborted) throw error;
      const delay = backoffDelay(attempt, BUFFER_RETRY_MIN_MS, BUFFER_RETRY_MAX_MS);
      wait.problem = `${kind.summary} (${oneLine((error as Error).message)})`;
      wait.attempts = attempt;
      wait.nextAttemptAt = Date.now() + delay;
      log.warn(
        { err: error, problem: kind.problem, attempt, retryInMs: delay },
        `${kind.summary}; next attempt in ${(delay / 1000).toFixed(1)}s`,
      );
      await sleep(delay, undefined, { signal });
    }
  }
}

/** A source's report while the buffer is not open yet: nothing streams. */
function waitingReport(
  source: string,
  config: Config,
  startedAt: number,
  wait: BufferWait,
  now: number,
): SourceReport {
  return {
    source,
    ready: now - startedAt < config.readinessGraceMs,
    state: 'starting',
    stateSeconds: Math.round((now - startedAt) / 1000),
    notStreamingSeconds: Math.round((now - startedAt) / 1000),
    attempts: 0,
    nextAttemptAt: null,
    lastError: wait.problem === null ? null : `waiting for the buffer database: ${wait.problem}`,
    lastErrorCode: null,
    lastErrorFix: null,
    lastErrorDocs: null,
    lastErrorAt: null,
    lastErrorDetails: null,
    checkpointLsn: null,
    confirmedLsn: null,
    lastStoredAt: null,
    retainedWalBytes: null,
    slotPolledAt: null,
    walStatus: null,
    lagBytes: null,
    lagSeconds: null,
    eventsPerSecond: 0,
    restarts: 0,
    snapshot: null,
    failingTables: null,
    owner: null,
  };
}

export async function run(config: Config, threads: ReaderThreads, version: string): Promise<void> {
  const startedAt = Date.now();
  // Process-wide lines carry no `source`; each source's lines get it once, from its child logger.
  const log = createLogger(config.logLevel);
  // This process's id among the replicas sharing the buffer (cdc_members); its buffer sessions
  // are named after it.
  const memberId = newMemberId(hostname(), process.pid);
  log.info({ sources: config.sources.map((s) => s.id), member: memberId }, 'philotes starting');

  const metrics = new Metrics(version);
  const wait: BufferWait = { problem: null, attempts: 0, nextAttemptAt: null };
  let store: BufferStore | null = null;
  let supervisor: Supervisor | null = null;
  let phase: 'starting' | 'running' | 'stopping' = 'starting';

  const reports = (now: number): SourceReport[] =>
    supervisor
      ? supervisor.runners.map((r) => r.report(now))
      : config.sources.map((s) => waitingReport(s.id, config, startedAt, wait, now));
  metrics.watchReadiness(() =>
    reports(Date.now()).map((r) => ({
      source: r.source,
      ready: r.ready,
      notStreaming: r.notStreamingSeconds ?? 0,
    })),
  );
  metrics.watchBuffer(() =>
    store !== null ? store.health.up() : wait.problem === null ? null : false,
  );
  /** What /readyz and the status page both show, computed once per request. */
  const readinessState = (now: number) => {
    const sources = reports(now);
    // The buffer as its connections last found it (buffer/health.ts), not as the pool was opened.
    const buffer: StatusPageData['buffer'] & Record<string, unknown> =
      store !== null
        ? { ...store.health.report() }
        : {
            state: 'waiting',
            problem: wait.problem,
            attempts: wait.attempts,
            nextAttemptAt:
              wait.nextAttemptAt === null ? null : new Date(wait.nextAttemptAt).toISOString(),
          };
    const fleet: FleetReport | null = supervisor
      ? {
          member: supervisor.leases.member.id,
          members: supervisor.leases.fleet().length,
          owned: supervisor.leases.owned().length,
        }
      : null;
    return {
      ready: phase !== 'stopping' && sources.every((s) => s.ready),
      buffer,
      sources,
      fleet,
    };
  };
  const readiness = (): Probe => {
    const { ready, buffer, sources, fleet } = readinessState(Date.now());
    return {
      ok: ready,
      body: {
        status: ready ? 'ready' : 'not ready',
        graceSeconds: config.readinessGraceMs / 1000,
        buffer,
        fleet,
        sources,
      },
    };
  };
  const liveness = (): Probe => ({
    ok: true,
    body: {
      status: 'ok',
      phase,
      uptimeSeconds: Math.round((Date.now() - startedAt) / 1000),
      sources: reports(Date.now()).map((r) => ({ source: r.source, state: r.state })),
    },
  });

  const page = (): string => {
    const now = Date.now();
    return renderStatusPage({
      ...readinessState(now),
      version,
      now,
      consumers: supervisor?.bufferKeeper.last.consumers ?? [],
      events: supervisor?.bufferKeeper.last.size ?? null,
    });
  };

  let server: http.Server | null = null;
  if (config.metricsPort !== 0) {
    try {
      server = await startHttpServer(
        config.metricsHost,
        config.metricsPort,
        metrics,
        { liveness, readiness, page },
        log,
      );
    } catch (error) {
      die(EXIT_USAGE, `PHILOTES_METRICS_PORT ${config.metricsPort}: ${(error as Error).message}`);
    }
  }

  const waitAbort = new AbortController();
  let shuttingDown: Promise<void> | null = null;
  const shutdown = (reason: string): Promise<void> => {
    shuttingDown ??= (async () => {
      phase = 'stopping';
      log.info({ reason }, 'shutting down: stopping readers');
      const deadline = setTimeout(() => {
        log.error(
          { timeoutMs: config.shutdownTimeoutMs },
          'shutdown deadline passed; forcing exit',
        );
        process.exit(EXIT_ERROR);
      }, config.shutdownTimeoutMs);
      deadline.unref();
      waitAbort.abort();
      if (supervisor) {
        await supervisor.stop();
        log.info('readers stopped; closing');
      }
      await threads.destroy();
      await store?.close();
      await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
      clearTimeout(deadline);
      log.info('shutdown complete');
    })();
    return shuttingDown;
  };

  let signals = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    signals++;
    if (signals > 1) {
      log.warn({ signal }, 'second signal: exiting now (the checkpoint keeps what is stored safe)');
      process.exit(130);
    }
    void shutdown(signal).then(() => process.exit(EXIT_OK));
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  process.on('SIGHUP', () => void reload());

  /**
   * SIGHUP: re-reads the configuration file. Added sources start, removed ones stop gracefully
   * (their slots stay), changed ones restart; an invalid file is rejected with its problems and
   * the running set is kept. Process-wide settings and the buffer change only with a restart.
   */
  const reload = async (): Promise<void> => {
    if (config.origin === 'environment') {
      log.warn(
        'SIGHUP: the configuration comes from the environment, which a running process cannot re-read; restart Philotes to change it',
      );
      return;
    }
    if (supervisor === null || shuttingDown) {
      log.warn('SIGHUP: not running yet (or stopping); nothing reloaded');
      return;
    }
    let next: Config;
    try {
      next = loadConfig(process.env, config.origin.file);
    } catch (error) {
      if (!(error instanceof ConfigError)) throw error;
      log.error(
        { problems: error.problems },
        `SIGHUP: ${config.origin.file} has ${error.problems.length} problem(s); keeping the running configuration`,
      );
      for (const problem of error.problems) process.stderr.write(`philotes: ${oneLine(problem)}\n`);
      return;
    }
    const ignored = processWideChanges(config, next);
    if (ignored.length > 0) {
      log.warn({ settings: ignored }, 'SIGHUP: these settings change only with a restart');
    }
    const result = await supervisor.reload(next);
    log.info(result, 'configuration reloaded');
  };

  try {
    store = await openBuffer(config, memberId, log, wait, waitAbort.signal);
  } catch (error) {
    if (shuttingDown) return; // a signal ended the wait; the handler exits
    const kind = classifyBufferError(error);
    const summary =
      (error as { code?: unknown }).code === '28P01'
        ? `${kind.summary} ${passwordSource(config.buffer)}`
        : kind.summary;
    const message = `buffer database ${config.buffer.host}:${config.buffer.port}/${config.buffer.database}: ${summary}: ${(error as Error).message}`;
    log.error({ err: error, problem: kind.problem }, 'cannot open buffer database');
    die(isFatal(error) || !kind.retry ? EXIT_USAGE : EXIT_ERROR, message);
  }
  if (shuttingDown) return;

  // A source that fails for good stays `failed` (and is retried slowly) while the others run:
  // the process itself stops only on a signal.
  supervisor = new Supervisor(
    config,
    threads,
    store,
    metrics,
    log,
    startedAt,
    { id: memberId, version },
    (source, message) => process.stderr.write(`philotes: source "${source}": ${message}\n`),
  );
  phase = 'running';
  await supervisor.run();
}

/** Settings of `next` that differ from the running ones and that a reload does not apply. */
function processWideChanges(running: Config, next: Config): string[] {
  const keys = [
    'buffer',
    'metricsPort',
    'metricsHost',
    'logLevel',
    'shutdownTimeoutMs',
    'restartMinDelayMs',
    'restartMaxDelayMs',
    'readinessGraceMs',
    'commitWriters',
    'commitCoalesce',
    'wakeups',
    'maxBytesInFlight',
    'leaseTtlMs',
    'leaseRenewIntervalMs',
    'maxSources',
    'rebalanceMinHoldMs',
  ] as const;
  return keys.filter((key) => JSON.stringify(running[key]) !== JSON.stringify(next[key]));
}
