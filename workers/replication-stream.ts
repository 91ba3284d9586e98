/**
 * The replication connection: START_REPLICATION, the CopyData framing, status updates, pausing
 * the socket, and closing. Every reach into pg's and pg-logical-replication's private parts
 * lives here, so that the reader above it deals only in messages and positions.
 */
import type pg from 'pg';
import { takeOverMessages } from './message-framing.js';
import { LogicalReplicationService } from 'pg-logical-replication';
import { formatLsn } from '../src/common/lsn.js';

/**
 * Session settings for the replication connection. pgoutput renders values with the walsender's
 * own settings, so these fix the text we decode: ISO dates in UTC, hex bytea, exact floats.
 */
export const REPLICATION_SESSION_OPTIONS = [
  '-c DateStyle=ISO',
  '-c TimeZone=UTC',
  '-c IntervalStyle=iso_8601',
  '-c bytea_output=hex',
  '-c extra_float_digits=3',
].join(' ');

/** XLogData: 'w', start LSN, end LSN, send time (8 bytes each), then the pgoutput message. */
export const XLOG_DATA = 0x77;
export const XLOG_DATA_HEADER = 25;
/** Primary keepalive: 'k', WAL end (8), send time (8), reply requested (1). */
export const KEEPALIVE = 0x6b;

/** The fields of a NoticeResponse we read (pg's NoticeMessage has these and more). */
export interface SourceNotice {
  readonly severity?: string | undefined;
  readonly code?: string | undefined;
  readonly message?: string | undefined;
}

export interface StreamEvents {
  /**
   * Every CopyData payload (XLogData or keepalive), synchronously, in stream order. `owned`: the
   * payload's memory is its own (a message assembled across reads), not a view into a read
   * buffer that later reads reuse, so it may be kept without a copy.
   */
  copyData(chunk: Buffer, owned: boolean): void;
  /** A warning from the walsender, in order with the data around it. */
  notice(notice: SourceNotice): void;
  /** The server accepted START_REPLICATION: this connection holds the slot. */
  started(): void;
  error(error: unknown): void;
}

export interface PgoutputOptions {
  /** 2 (PostgreSQL 14+): large in-progress transactions are streamed as they are decoded. */
  readonly protocol: 1 | 2;
  /** Ask for logical messages too (PostgreSQL 14+; older servers refuse the option). */
  readonly messages: boolean;
  /** This connection's wal_sender_timeout (PostgreSQL 12+); null: the server's. */
  readonly walSenderTimeoutMs: number | null;
}

type SubscribePlugin = Parameters<LogicalReplicationService['subscribe']>[0];

/** pg's own copyData listener on the connection (a no-op for our query); it stays. */
const PG_COPY_DATA_LISTENER = 'bound _handleCopyData';

/**
 * The "plugin" pg-logical-replication calls to start streaming. It sends START_REPLICATION and
 * takes the stream over: the library has just attached its copyData listener, which per message
 * formats an LSN string, emits an event and creates a promise, costing more than our whole
 * decoding. We detach it and hand each CopyData payload to the reader. The library still owns
 * the connection: connecting, errors, status updates, closing.
 */
class StreamTakeover {
  readonly name = 'pgoutput';
  constructor(
    private readonly publication: string,
    private readonly events: StreamEvents,
    private readonly options: PgoutputOptions,
  ) {}
  parse(buffer: Buffer): Buffer {
    return buffer; // unused: the library's listener is gone before the first message
  }
  start(client: pg.Client, slot: string, lsn: string): Promise<unknown> {
    const connection = (client as unknown as { connection: NodeJS.EventEmitter }).connection;
    for (const listener of connection.listeners('copyData') as Array<
      (...args: unknown[]) => void
    >) {
      if (listener.name !== PG_COPY_DATA_LISTENER) connection.removeListener('copyData', listener);
    }
    const { events } = this;
    connection.on('copyData', (message: { chunk: Buffer }) =>
      events.copyData(message.chunk, false),
    );
    takeOverCopyData(connection, (payload, owned) => events.copyData(payload, owned));
    client.on('notice', (notice) => events.notice(notice));
    // Both names are validated against /^[a-z_][a-z0-9_]*$/ by the config module.
    const { protocol, messages } = this.options;
    return client.query(
      `START_REPLICATION SLOT "${slot}" LOGICAL ${lsn} (proto_version '${protocol}', publication_names '"${this.publication}"'${messages ? ", messages 'true'" : ''}${protocol >= 2 ? ", streaming 'on'" : ''})`,
    );
  }
}

/** Protocol message type of CopyData. */
const COPY_DATA = 0x64; // 'd'

/**
 * Frames the connection's CopyData messages ourselves, ahead of pg's parser (see
 * takeOverMessages). The connection is idle when this is called (START_REPLICATION is not sent
 * yet), so no partial message sits in pg's parser.
 */
export function takeOverCopyData(
  connection: NodeJS.EventEmitter,
  onCopyData: (payload: Buffer, owned: boolean) => void,
): void {
  takeOverMessages(
    connection,
    (type) => type === COPY_DATA,
    (_type, payload, owned) => onCopyData(payload, owned),
  );
}

export class ReplicationStream {
  private readonly service: LogicalReplicationService;
  private readonly plugin: StreamTakeover;

  constructor(
    options: pg.ClientConfig,
    publication: string,
    events: StreamEvents,
    pgoutput: PgoutputOptions,
  ) {
    this.service = new LogicalReplicationService(
      {
        ...options,
        options:
          pgoutput.walSenderTimeoutMs === null
            ? REPLICATION_SESSION_OPTIONS
            : `${REPLICATION_SESSION_OPTIONS} -c wal_sender_timeout=${pgoutput.walSenderTimeoutMs}`,
      },
      // timeoutSeconds: 0 turns off the library's own timer, which would confirm the last
      // *received* LSN. Every status update is sent by acknowledge() below.
      { acknowledge: { auto: false, timeoutSeconds: 0 }, flowControl: { enabled: false } },
    );
    this.plugin = new StreamTakeover(publication, events, pgoutput);
    this.service.on('error', (error: unknown) => events.error(error));
    this.service.on('start', () => events.started());
  }

  /** Streams the slot from `lsn`; settles when the stream ends (rejects on a failure). */
  start(slot: string, lsn: bigint): Promise<unknown> {
    return this.service.subscribe(this.plugin as unknown as SubscribePlugin, slot, formatLsn(lsn));
  }

  /**
   * Sends a status update confirming `lsn` (written = flushed = applied); `ping` asks the server
   * to reply. The library reports (lsn + 1); we ask for exactly `lsn`: confirming one byte too
   * far could skip a commit record that starts right there.
   */
  acknowledge(lsn: bigint, ping: boolean): Promise<unknown> {
    return this.service.acknowledge(formatLsn(lsn - 1n), ping);
  }

  /**
   * The library keeps the pg connection (and its socket) on `_connection`; it pauses that same
   * socket for its own flow control. Pausing it is our backpressure.
   */
  private socket(): { pause(): void; resume(): void } | undefined {
    return (
      this.service as unknown as { _connection?: { stream?: { pause(): void; resume(): void } } }
    )._connection?.stream;
  }

  pause(): void {
    this.socket()?.pause();
  }

  resume(): void {
    this.socket()?.resume();
  }

  /** Ends the connection politely (the server acknowledges the end). */
  destroy(): Promise<unknown> {
    return this.service.destroy();
  }

  /** Drops the socket at once: for a peer that will never answer the goodbye. */
  dropSocket(): void {
    // The library keeps its client on `_client`; pg keeps the socket on `connection.stream`.
    const client = (this.service as unknown as { _client?: unknown })._client;
    dropClientSocket(client);
  }
}

/** Destroys a pg client's socket without a goodbye. */
export function dropClientSocket(client: unknown): void {
  (
    client as { connection?: { stream?: { destroy(): void } } } | null | undefined
  )?.connection?.stream?.destroy();
}
