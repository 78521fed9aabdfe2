import { PkiError } from './pki-error';

const MS_PER_UNIT: Readonly<Record<string, number>> = {
  ms: 1,
  s: 1_000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
};

/** Largest to smallest; a duration must list its parts in this order, each at most once. */
const UNIT_ORDER = ['d', 'h', 'm', 's', 'ms'] as const;

const PART = /(\d+)(ms|s|m|h|d)/y;

/** One-line hint appended to every parse error so the operator sees the accepted form. */
const HINT = 'expected whole numbers with units d, h, m, s or ms, largest first, e.g. 90s, 15m, 24h, 7d, 1h30m';

/**
 * Parses a duration such as `90s`, `15m`, `24h`, `7d` or `1h30m` into milliseconds.
 *
 * Grammar: one or more `<digits><unit>` parts, units `d h m s ms`, each unit at most once
 * and largest first (`1h30m`, not `30m1h`); surrounding whitespace is ignored.
 * A bare number is rejected because its unit would be a guess, and so are
 * fractions and signs, which keeps the format unambiguous. `0s` parses to 0;
 * callers that need a positive value check that themselves.
 *
 * @throws PkiError naming the bad text.
 */
export function parseDuration(text: string): number {
  const source = typeof text === 'string' ? text.trim() : '';
  const fail = (): never => {
    throw new PkiError(`invalid duration '${String(text)}': ${HINT}`);
  };
  if (source === '') fail();

  let totalMs = 0;
  let lastUnitRank = -1;
  PART.lastIndex = 0;
  while (PART.lastIndex < source.length) {
    const match = PART.exec(source);
    if (match === null) fail();
    const [, digits, unit] = match as RegExpExecArray;
    const rank = UNIT_ORDER.indexOf(unit as (typeof UNIT_ORDER)[number]);
    // Out-of-order or repeated units are almost always typos ('1h1h', '30m1h').
    if (rank <= lastUnitRank) fail();
    lastUnitRank = rank;
    totalMs += Number(digits) * MS_PER_UNIT[unit as string]!;
  }
  if (!Number.isSafeInteger(totalMs)) {
    throw new PkiError(`invalid duration '${text}': too large`);
  }
  return totalMs;
}
