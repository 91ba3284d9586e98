/**
 * Our own framing of a pg connection's protocol messages (see takeOverMessages).
 */
/** The size of a message's type and length. */
const MESSAGE_HEADER = 5;

/**
 * Frames a pg connection's messages ourselves, ahead of pg's parser: those `wanted` (by their
 * type, decided as each message's header arrives) go to `onMessage` as their body, every other
 * one to pg as it was.
 *
 * - The replication connection's CopyData: pg's parser grows its buffer by doubling while a
 *   message arrives, so a 50 MB value briefly costs 64 + 32 MB before we even see it; here a
 *   message that spans socket reads gets a buffer of exactly its size, and one within a read is
 *   not copied at all (the payload is valid during the call, as with pg's).
 * - A snapshot's DataRows: pg would turn every column into a string; here the row stays bytes,
 *   which the encoder reads as it reads the stream's tuples.
 *
 * Call it while the connection is idle, so that no partial message sits in pg's parser. With
 * other than the one data listener pg installs, nothing is taken over (returns false).
 */
export function takeOverMessages(
  connection: NodeJS.EventEmitter,
  wanted: (type: number) => boolean,
  onMessage: (type: number, payload: Buffer, owned: boolean) => void,
): boolean {
  const socket = (connection as unknown as { stream?: NodeJS.EventEmitter }).stream;
  const listeners = socket?.listeners('data') as Array<(chunk: Buffer) => void> | undefined;
  if (!socket || listeners?.length !== 1) return false;
  const pgParse = listeners[0]!;
  socket.removeListener('data', pgParse);
  const header = Buffer.alloc(MESSAGE_HEADER);
  let headerBytes = 0;
  /** The message being assembled across reads: its type, its buffer, how much is filled. */
  let type = 0;
  let mine = false;
  let message: Buffer | null = null;
  let filled = 0;
  const complete = (full: Buffer, bodyStart: number) => {
    if (mine) onMessage(type, full.subarray(bodyStart), true);
    else pgParse(full);
  };
  socket.on('data', (chunk: Buffer) => {
    let offset = 0;
    while (offset < chunk.length) {
      if (message !== null) {
        const n = Math.min(message.length - filled, chunk.length - offset);
        chunk.copy(message, filled, offset, offset + n);
        filled += n;
        offset += n;
        if (filled === message.length) {
          const done = message;
          message = null;
          complete(done, mine ? 0 : MESSAGE_HEADER);
        }
        continue;
      }
      let start: number;
      if (headerBytes > 0 || chunk.length - offset < MESSAGE_HEADER) {
        // A header split across reads.
        const n = Math.min(MESSAGE_HEADER - headerBytes, chunk.length - offset);
        chunk.copy(header, headerBytes, offset, offset + n);
        headerBytes += n;
        offset += n;
        if (headerBytes < MESSAGE_HEADER) return;
        headerBytes = 0;
        start = -1;
      } else {
        chunk.copy(header, 0, offset, offset + MESSAGE_HEADER);
        start = offset;
        offset += MESSAGE_HEADER;
      }
      type = header[0]!;
      mine = wanted(type);
      const bodyLength = header.readInt32BE(1) - 4;
      if (start >= 0 && chunk.length - offset >= bodyLength) {
        // Whole within this read: no copy.
        const end = offset + bodyLength;
        if (mine) onMessage(type, chunk.subarray(offset, end), false);
        else pgParse(chunk.subarray(start, end));
        offset = end;
        continue;
      }
      if (mine) {
        message = Buffer.allocUnsafe(bodyLength);
        filled = 0;
      } else {
        message = Buffer.allocUnsafe(MESSAGE_HEADER + bodyLength);
        header.copy(message, 0);
        filled = MESSAGE_HEADER;
      }
      if (message.length === filled) {
        const done = message;
        message = null;
        complete(done, mine ? 0 : MESSAGE_HEADER);
      }
    }
  });
  return true;
}
