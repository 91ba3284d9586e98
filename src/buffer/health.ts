/**
 * The buffer's real state, for /readyz, the status page and `philotes_buffer_up`: open while
 * connections to it succeed, and what the last failure was once they do not. An open pool is not
 * an open buffer: with the buffer stopped, the process used to report "open" for as long as it
 * ran. Every buffer connection the running side takes goes through the pool, so the pool is
 * where this is seen (store.ts wires it): a connection made or reused marks it open; a connection
 * refused, a connection lost, or an error of the buffer's own kind (full disk, read-only, no
 * privilege, wrong password) marks it down with the one-line summary of classifyBufferError.
 */
import type pg from 'pg';
import { classifyBufferError, describeConnectionError } from '../common/errors.js';
import type { ConnectionConfig } from '../common/config.js';

export type BufferState = 'open' | 'unreachable' | 'failing';

export interface BufferHealthReport {
  readonly state: BufferState;
  /** What failed, in one line, naming the buffer; null while open. */
  readonly problem: string | null;
  /** When the state began. */
  readonly since: string;
}

export class BufferHealth {
  private state: BufferState = 'open';
  private problem: string | null = null;
  private since = Date.now();

  constructor(private readonly conn: ConnectionConfig) {}

  ok(): void {
    if (this.state === 'open') return;
    this.state = 'open';
    this.problem = null;
    this.since = Date.now();
  }

  failed(error: unknown): void {
    const kind = classifyBufferError(error);
    // A statement's own error (a constraint, a cancelled query) says nothing about the buffer.
    if (kind.problem === 'other') return;
    const state: BufferState = kind.problem === 'unreachable' ? 'unreachable' : 'failing';
    if (this.state !== state) this.since = Date.now();
    this.state = state;
    const described = describeConnectionError(error, 'buffer', this.conn.host, this.conn.port);
    this.problem = `${kind.summary} (${this.where()}): ${(described as Error).message ?? String(described)}`;
  }

  report(): BufferHealthReport {
    return { state: this.state, problem: this.problem, since: new Date(this.since).toISOString() };
  }

  up(): boolean {
    return this.state === 'open';
  }

  private where(): string {
    return `${this.conn.host}:${this.conn.port}/${this.conn.database}`;
  }

  /**
   * Sees every connection the pool hands out: pg-pool's own query() takes its client through
   * connect(callback), the writers through connect(); both forms are kept.
   */
  watch(pool: pg.Pool): void {
    const connect = pool.connect.bind(pool) as (
      callback?: (error: Error | undefined, client?: pg.PoolClient, done?: unknown) => void,
    ) => Promise<pg.PoolClient> | undefined;
    const describe = (error: unknown): unknown =>
      describeConnectionError(error, 'buffer', this.conn.host, this.conn.port);
    pool.connect = ((
      callback?: (error: Error | undefined, client?: pg.PoolClient, done?: unknown) => void,
    ) => {
      if (callback !== undefined)
        return connect((error, client, done) => {
          if (error) this.failed(error);
          else this.ok();
          callback(error ? (describe(error) as Error) : error, client, done);
        });
      return connect()!.then(
        (client) => {
          this.ok();
          return client;
        },
        (error: unknown) => {
          this.failed(error);
          throw describe(error);
        },
      );
    }) as typeof pool.connect;
    pool.on('error', (error) => this.failed(error));
  }
}
