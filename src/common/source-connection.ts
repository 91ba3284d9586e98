/**
 * A command's plain (not replication) connection to a source: connected, with a failure to
 * connect described as where and why ("connect timeout to source 10.0.0.5:5432"), and a lost
 * connection left to reject the query in flight.
 */
import pg from 'pg';
import type { SourceConfig } from './config.js';
import { describeConnectionError } from './errors.js';
import { pgClientOptions } from './pg-connection.js';

export async function connectSource(source: SourceConfig): Promise<pg.Client> {
  const client = new pg.Client(pgClientOptions(source.connection, `philotes:${source.id}`));
  client.on('error', () => undefined);
  try {
    await client.connect();
  } catch (error) {
    await client.end().catch(() => undefined);
    throw describeConnectionError(error, 'source', source.connection.host, source.connection.port);
  }
  return client;
}
