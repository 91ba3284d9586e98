/**
 * The configuration file (PHILOTES_CONFIG or --config): YAML (or JSON, which YAML reads too)
 * with any number of sources. Its structure is checked with a schema (unknown keys with a "did
 * you mean", wrong types), then every value with the same checks as the environment's, each
 * problem named by its path in the file (`sources[3].slot`). All problems are reported at once.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { closest } from './closest.js';
import type * as YamlModule from 'yaml';
import type { z as Zod } from 'zod';
import type { Config, ConnectionConfig, SourceConfig, SourceSettings } from './config-types.js';
import {
  ConfigError,
  connection,
  envNames,
  get,
  identifier,
  Problems,
  sourceId,
  type ConnectionField,
  type Env,
  type KeylessTables,
  type SnapshotMode,
} from './config-fields.js';
import {
  CONNECTION_FILE_KEYS,
  PROCESS_SETTINGS,
  readProcessSettings,
  readSourceSettings,
  SOURCE_IDENTITY as S,
  SOURCE_SETTINGS,
} from './config-registry.js';

/** Process-wide settings: the environment variable wins over the file's top-level key. */
const PROCESS_KEYS: Readonly<Record<string, string>> = Object.fromEntries(
  PROCESS_SETTINGS.map((s) => [s.env, s.fileKey]),
);

/** The keys a connection may have (buffer, each source). */
const CONNECTION_KEYS = CONNECTION_FILE_KEYS;

/**
 * The parser and the schema library load only when a file is read: most deployments of one
 * source use the environment, and start-up (the reader threads wait for the config) should not
 * pay ~60 ms for them.
 */
const load = createRequire(import.meta.url);
let cached: ReturnType<typeof buildSchemas> | undefined;

function buildSchemas() {
  const yaml = load('yaml') as typeof YamlModule;
  const { z } = load('zod') as { z: typeof Zod };
  /**
   * Numbers and strings are both fine where a value is written (port: 5432, batchMaxWait: 20ms),
   * and booleans (commitCoalesce: false); each setting's reader says what it accepts.
   */
  const scalar = z.union([z.string(), z.number(), z.boolean()]);
  const connectionKeys = Object.fromEntries(
    CONNECTION_KEYS.map((key) => [key, key === 'port' ? scalar : z.string()]),
  );
  const settingKeys = Object.fromEntries(SOURCE_SETTINGS.map((s) => [s.fileKey, scalar]));
  const source = z
    .object({
      [S.id.fileKey]: z.string(),
      [S.slot.fileKey]: z.string(),
      [S.publication.fileKey]: z.string(),
      [S.tables.fileKey]: z.array(z.string()),
      [S.partitionRoot.fileKey]: scalar,
      [S.messages.fileKey]: z.array(z.string().min(1)),
      [S.ddl.fileKey]: scalar,
      [S.failover.fileKey]: scalar,
      [S.protocol.fileKey]: scalar,
      [S.snapshot.fileKey]: scalar,
      [S.keylessTables.fileKey]: scalar,
      ...connectionKeys,
      ...settingKeys,
    })
    .partial()
    .required({ id: true, slot: true })
    .strict();
  const file = z
    .object({
      buffer: z.object(connectionKeys).partial().strict(),
      defaults: z
        .object({ ...settingKeys, snapshot: scalar, keylessTables: scalar })
        .partial()
        .strict(),
      sources: z.array(source).min(1),
      ...Object.fromEntries(Object.values(PROCESS_KEYS).map((key) => [key, scalar])),
    })
    .partial()
    .required({ sources: true })
    .strict();
  return { yaml, file, source, connectionKeys, settingKeys };
}

function schemas(): ReturnType<typeof buildSchemas> {
  return (cached ??= buildSchemas());
}

type RawObject = Record<string, unknown>;

/** What reading a file's values needs: the environment, the flat map of values, the problems. */
interface Reading {
  readonly env: Env;
  readonly flat: Record<string, string | undefined>;
  /** A scalar into the flat map under `key`; anything else was reported by the schema. */
  readonly put: (key: string, value: unknown) => void;
  readonly problems: Problems;
  /** The file being read: each source remembers it, for the commands its messages suggest. */
  readonly path: string;
}

export function loadConfigFile(path: string, env: Env): Config {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    throw new ConfigError(
      `the config file ${path} cannot be read: ${(error as NodeJS.ErrnoException).code ?? 'error'}`,
    );
  }
  let raw: unknown;
  try {
    raw = schemas().yaml.parse(text);
  } catch (error) {
    // The parser's message names the line and column, not the content.
    throw new ConfigError(
      `the config file ${path} is not valid YAML or JSON: ${(error as Error).message.split('\n')[0]}`,
    );
  }
  const problems = new Problems();
  const envConflicts = Object.keys(env).filter(
    (key) => /^PHILOTES_CDC_/.test(key) && get(env, key) !== undefined && key !== 'PHILOTES_CONFIG',
  );
  if (envConflicts.length > 0) {
    problems.add(
      `${envConflicts.sort().join(', ')} ${envConflicts.length === 1 ? 'is' : 'are'} set together with the config file ${path}: with a file, sources and their settings come from the file only (per source, or under defaults:)`,
    );
  }
  const checked = schemas().file.safeParse(raw);
  if (!checked.success) {
    // One problem a line: several unknown keys at one level are several problems.
    for (const issue of checked.error.issues)
      for (const line of describeIssue(issue).split('\n')) problems.add(line);
  }
  const file: RawObject = isObject(raw) ? raw : {};

  // Values are read as the environment's are: from a flat map of strings, keyed by their path.
  const flat: Record<string, string | undefined> = { ...env };
  const put = (key: string, value: unknown) => {
    if (typeof value === 'string' || typeof value === 'number' || typeof value === 'boolean')
      flat[key] = String(value);
  };

  for (const key of Object.values(PROCESS_KEYS)) put(key, file[key]);
  const processWide = readProcessSettings(flat, problems, (variable) =>
    get(env, variable) !== undefined ? variable : PROCESS_KEYS[variable]!,
  );

  const defaults = isObject(file['defaults']) ? file['defaults'] : {};
  for (const s of SOURCE_SETTINGS) put(`defaults.${s.fileKey}`, defaults[s.fileKey]);
  const defaultSettings = readSourceSettings(flat, (s) => `defaults.${s.fileKey}`, problems);
  put('defaults.snapshot', defaults['snapshot']);
  const defaultSnapshot = problems.attempt(() => S.snapshot.read(flat, 'defaults.snapshot'));
  put('defaults.keylessTables', defaults['keylessTables']);
  const defaultKeyless = problems.attempt(() =>
    S.keylessTables.read(flat, 'defaults.keylessTables'),
  );

  const reading: Reading = { env, flat, put, problems, path };
  const buffer = readBuffer(file, reading);

  const rawSources = Array.isArray(file['sources']) ? file['sources'] : [];
  const read: Array<{ index: number; source: SourceConfig }> = [];
  rawSources.forEach((entry: unknown, index) => {
    if (!isObject(entry)) return; // the schema said so
    const at = `sources[${index}]`;
    const source = readSource(entry, at, reading, defaultSettings, {
      snapshot: defaultSnapshot ?? 'initial',
      keylessTables: defaultKeyless ?? 'block',
    });
    if (source) read.push({ index, source });
  });
  checkUnique(read, problems);
  const sources = read.map((r) => r.source);
  // In the file's order: by path, sources[2] before sources[10].
  problems.list.sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  problems.throwIfAny();
  return Object.freeze({
    sources: Object.freeze(sources),
    buffer: buffer!,
    origin: Object.freeze({ file: path }),
    ...defaultSettings,
    ...processWide,
  });
}

function isObject(value: unknown): value is RawObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** `sources[3].slot`, `buffer.url`: a path as the file spells it. */
function pathOf(path: ReadonlyArray<PropertyKey>): string {
  let out = '';
  for (const part of path) {
    if (typeof part === 'number') out += `[${part}]`;
    else out += out === '' ? String(part) : `.${String(part)}`;
  }
  return out || '(the file)';
}

function describeIssue(issue: Zod.core.$ZodIssue): string {
  const at = pathOf(issue.path);
  if (issue.code === 'unrecognized_keys') {
    const known = knownKeys(issue.path);
    return issue.keys
      .map((key) => {
        const near = closest(key, known);
        const where = issue.path.length > 0 ? `${at}.${key}` : key;
        return `${where}: unknown key${near ? ` (did you mean "${near}"?)` : ''}`;
      })
      .join('\n');
  }
  if (issue.code === 'invalid_type' && issue.input === undefined) return `${at} is required`;
  if (issue.code === 'invalid_type' || issue.code === 'invalid_union') {
    return `${at}: expected ${issue.code === 'invalid_union' ? 'a string or a number' : issue.expected}`;
  }
  if (issue.code === 'too_small') return `${at}: must list at least one source`;
  return `${at}: ${issue.message}`;
}

function knownKeys(path: ReadonlyArray<PropertyKey>): string[] {
  const { file, source, connectionKeys, settingKeys } = schemas();
  if (path.length === 0) return Object.keys(file.shape);
  if (path[0] === 'buffer') return Object.keys(connectionKeys);
  if (path[0] === 'defaults') return [...Object.keys(settingKeys), 'snapshot', 'keylessTables'];
  return Object.keys(source.shape);
}

/**
 * A connection's settings into the flat map under `at.<field>`; the password from `password`,
 * the variable `passwordEnv` names, or the file `passwordFile` names (a Kubernetes secret).
 */
function putConnection(raw: RawObject, at: string, { env, flat, put, problems }: Reading): void {
  for (const field of ['url', 'host', 'port', 'database', 'user', 'sslmode', 'sslRootCert'])
    put(`${at}.${field}`, raw[field]);
  const given = ['password', 'passwordEnv', 'passwordFile'].filter((k) => raw[k] !== undefined);
  if (given.length > 1) {
    problems.add(`${at}: set one of ${given.join(', ')}, not several`);
    return;
  }
  if (typeof raw['password'] === 'string') flat[`${at}.password`] = raw['password'];
  if (typeof raw['passwordEnv'] === 'string') {
    const variable = raw['passwordEnv'];
    const value = env[variable];
    if (value === undefined || value === '') {
      problems.add(`${at}.passwordEnv: the environment variable ${variable} is not set`);
    } else flat[`${at}.password`] = value;
  }
  if (typeof raw['passwordFile'] === 'string') {
    try {
      // A trailing newline (echo > file, most secret tools) is not part of the password.
      flat[`${at}.password`] = readFileSync(raw['passwordFile'], 'utf8').replace(/\r?\n$/, '');
    } catch (error) {
      problems.add(
        `${at}.passwordFile cannot be read: ${(error as NodeJS.ErrnoException).code ?? 'error'} ${raw['passwordFile']}`,
      );
    }
  }
}

/**
 * A connection remembers where its password came from: the file, read again at each attempt;
 * the variable or file key by its name, for error lines and print-config.
 */
function withPasswordFile(
  conn: ConnectionConfig | undefined,
  raw: RawObject,
  at: string,
): ConnectionConfig | undefined {
  if (conn === undefined) return conn;
  const file = raw['passwordFile'];
  const variable = raw['passwordEnv'];
  if (typeof file === 'string')
    return Object.freeze({ ...conn, passwordFile: file, passwordSetting: `${at}.passwordFile` });
  if (typeof variable === 'string')
    return Object.freeze({
      ...conn,
      passwordEnv: variable,
      passwordSetting: `${at}.passwordEnv (${variable})`,
    });
  return conn;
}

const fileNames =
  (at: string) =>
  (field: ConnectionField): string =>
    `${at}.${field}`;

function readBuffer(file: RawObject, reading: Reading): ConnectionConfig | undefined {
  const { env, flat, problems } = reading;
  const fromEnv = Object.keys(env).filter(
    (key) => key.startsWith('PHILOTES_BUFFER_') && get(env, key) !== undefined,
  );
  if (!isObject(file['buffer'])) {
    // No buffer in the file: the environment's PHILOTES_BUFFER_* (one buffer for many files).
    const conn = problems.attempt(() => connection(env, envNames('PHILOTES_BUFFER')));
    return conn && Object.freeze({ ...conn, fromEnvironment: true });
  }
  if (fromEnv.length > 0) {
    problems.add(
      `the buffer is set twice: in the config file (buffer:) and by ${fromEnv.sort().join(', ')}; keep one`,
    );
    return undefined;
  }
  putConnection(file['buffer'], 'buffer', reading);
  return withPasswordFile(
    problems.attempt(() => connection(flat, fileNames('buffer'))),
    file['buffer'],
    'buffer',
  );
}

function readSource(
  raw: RawObject,
  at: string,
  reading: Reading,
  defaults: SourceSettings,
  sourceDefaults: { readonly snapshot: SnapshotMode; readonly keylessTables: KeylessTables },
): SourceConfig | undefined {
  const { flat, put, problems } = reading;
  const before = problems.list.length;
  put(`${at}.id`, raw['id']);
  put(`${at}.slot`, raw['slot']);
  put(`${at}.publication`, raw['publication']);
  if (Array.isArray(raw['tables']) && raw['tables'].every((t) => typeof t === 'string')) {
    // Table names cannot hold a comma (the check below allows none): the list's own format.
    flat[`${at}.tables`] = raw['tables'].join(',');
  }
  const id =
    get(flat, `${at}.id`) === undefined
      ? undefined
      : problems.attempt(() => sourceId(flat, `${at}.id`, ''));
  const slot =
    get(flat, `${at}.slot`) === undefined
      ? undefined
      : problems.attempt(() => identifier(flat, `${at}.slot`, ''));
  const publication = problems.attempt(() => S.publication.read(flat, `${at}.publication`));
  const tableList = problems.attempt(() => S.tables.read(flat, `${at}.tables`));
  put(`${at}.partitionRoot`, raw['partitionRoot']);
  // An array in the file: prefixes may hold commas, so they are taken as they are.
  const messages = Array.isArray(raw['messages'])
    ? raw['messages'].filter((m): m is string => typeof m === 'string' && m !== '')
    : [];
  const partitionRoot = problems.attempt(() => S.partitionRoot.read(flat, `${at}.partitionRoot`));
  put(`${at}.ddl`, raw['ddl']);
  put(`${at}.protocol`, raw['protocol']);
  const ddl = problems.attempt(() => S.ddl.read(flat, `${at}.ddl`));
  put(`${at}.failover`, raw['failover']);
  const failover = problems.attempt(() => S.failover.read(flat, `${at}.failover`));
  const protocol = problems.attempt(() => S.protocol.read(flat, `${at}.protocol`));
  put(`${at}.snapshot`, raw['snapshot']);
  const snapshot =
    raw['snapshot'] === undefined
      ? sourceDefaults.snapshot
      : problems.attempt(() => S.snapshot.read(flat, `${at}.snapshot`));
  put(`${at}.keylessTables`, raw['keylessTables']);
  const keyless =
    raw['keylessTables'] === undefined
      ? sourceDefaults.keylessTables
      : problems.attempt(() => S.keylessTables.read(flat, `${at}.keylessTables`));
  for (const s of SOURCE_SETTINGS) put(`${at}.${s.fileKey}`, raw[s.fileKey]);
  const settings = readSourceSettings(flat, (s) => `${at}.${s.fileKey}`, problems, defaults);
  putConnection(raw, at, reading);
  const conn = withPasswordFile(
    problems.attempt(() => connection(flat, fileNames(at))),
    raw,
    at,
  );
  if (problems.list.length > before || id === undefined || slot === undefined) return undefined;
  return Object.freeze({
    id,
    connection: conn!,
    slot,
    publication: publication!,
    tables: Object.freeze(tableList!),
    partitionRoot: partitionRoot!,
    messages: Object.freeze(messages),
    ddl: ddl!,
    failover: failover!,
    protocol: protocol ?? null,
    snapshot: snapshot ?? 'initial',
    keylessTables: keyless ?? 'block',
    configFile: reading.path,
    settings,
  });
}

/** Two entries for one source would capture it twice, or fight over its slot. */
function checkUnique(
  sources: ReadonlyArray<{ index: number; source: SourceConfig }>,
  problems: Problems,
): void {
  const ids = new Map<string, number>();
  const slots = new Map<string, number>();
  sources.forEach(({ index: i, source }) => {
    const idAt = ids.get(source.id);
    if (idAt !== undefined) {
      problems.add(
        `sources[${i}].id: "${source.id}" is already the id of sources[${idAt}]; ids must be unique`,
      );
    } else ids.set(source.id, i);
    const { host, port, database } = source.connection;
    const key = `${host}:${port}/${database}/${source.slot}`;
    const slotAt = slots.get(key);
    if (slotAt !== undefined) {
      problems.add(
        `sources[${i}].slot: sources[${slotAt}] already reads slot "${source.slot}" on ${host}:${port}/${database}; each source needs a slot of its own`,
      );
    } else slots.set(key, i);
  });
}
