/**
 * The buffer's session-level advisory lock for a source, on a connection of its own that holds it
 * for the whole reader run.
 */
import pg from 'pg';

export interface SourceLock {
  /** Rejects if the connection holding the lock is lost (and with it, the lock). */
  readonly lost: Promise<never>;
  release(): Promise<void>;
}

/**
 * Takes the buffer's session-level advisory lock for a source, on a connection of its own that
 * holds it for the whole reader run. Two processes capturing one source (a rolling deploy, a
 * copy-pasted config) would otherwise interleave: one's start-up cleanup could delete the part
 * of a large transaction the other has stored. Returns null if another process holds it.
 */
export async function lockSource(
  clientOptions: pg.ClientConfig,
  sourceId: string,
): Promise<SourceLock | null> {
  const client = new pg.Client(clientOptions);
  let onLost!: (error: Error) => void;
  const lost = new Promise<never>((_, reject) => {
    onLost = reject;
  });
  lost.catch(() => undefined);
  let released = false;
  client.on('error', (error) => onLost(error));
  client.on('end', () => {
    if (!released)
      onLost(new Error(`lost the buffer connection holding the lock for source "${sourceId}"`));
  });
  await client.connect();
  try {
    const result = await client.query<{ locked: boolean }>(
      `SELECT pg_try_advisory_lock(hashtextextended('philotes:source:' || $1, 0)) AS locked`,
      [sourceId],
    );
    if (!result.rows[0]?.locked) {
      released = true;
      await client.end();
      return null;
    }
  } catch (error) {
    released = true;
    await client.end().catch(() => undefined);
    throw error;
  }
  return {
    lost,
    release: async () => {
      released = true;
      // Ending the session releases the lock.
      await client.end().catch(() => undefined);
    },
  };
}
