/** Exit codes and the one-line message a failed start leaves on stderr. */

export const EXIT_OK = 0;
/** Anything else. */
export const EXIT_ERROR = 1;
/** Configuration or source errors a person must fix. */
export const EXIT_USAGE = 2;

export function oneLine(message: string): string {
  return message.replace(/\s*\n\s*/g, ' ');
}

export function die(code: number, message: string): never {
  process.stderr.write(`philotes: ${oneLine(message)}\n`);
  process.exit(code);
}

/** A command that cannot do what it was asked, and the exit code that says why. */
export class CommandError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}
