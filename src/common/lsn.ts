/**
 * LSNs as BigInt. The same position is spelled '0/16B3748' outside messages and
 * '00000000/016B3748' inside some, so never compare the strings.
 */
export function parseLsn(text: string): bigint {
  const match = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/.exec(text);
  if (!match) throw new Error(`invalid LSN ${JSON.stringify(text)}`);
  return (BigInt(`0x${match[1]}`) << 32n) | BigInt(`0x${match[2]}`);
}

export function formatLsn(lsn: bigint): string {
  return `${(lsn >> 32n).toString(16).toUpperCase()}/${(lsn & 0xffffffffn).toString(16).toUpperCase()}`;
}

/** For gauges: exact up to 2^53 bytes of WAL (8 PiB), far beyond any real server. */
export function lsnToNumber(lsn: bigint): number {
  return Number(lsn);
}

/** A WAL distance for people: "123 B", "4.5 MB", "1.2 GB". */
export function formatBytes(bytes: bigint): string {
  const n = Number(bytes < 0n ? -bytes : bytes);
  const units = ['B', 'kB', 'MB', 'GB', 'TB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = unit === 0 ? String(value) : value.toFixed(value < 10 ? 1 : 0);
  return `${bytes < 0n ? '-' : ''}${text} ${units[unit]}`;
}
