import { entityLiteral } from './cedar-text';

/** An entity uid in Cedar's JSON form. */
export interface EntityUid {
  type: string;
  id: string;
}

/** One entity in Cedar's JSON entity format, uids normalized to `{type, id}`. */
export interface EntityRecord {
  uid: EntityUid;
  attrs: Record<string, unknown>;
  parents: EntityUid[];
  tags?: Record<string, unknown>;
}

/** The key of an entity in maps and sets: its Cedar literal, `User::"alice"`. */
export function entityKey(uid: EntityUid): string {
  return entityLiteral(uid.type, uid.id);
}

function isUidShape(v: unknown): v is EntityUid {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const o = v as Record<string, unknown>;
  return typeof o.type === 'string' && typeof o.id === 'string' && Object.keys(o).length === 2;
}

/** Accepts both Cedar uid spellings, `{type, id}` and `{"__entity": {type, id}}`. */
export function asEntityUid(v: unknown): EntityUid | undefined {
  if (isUidShape(v)) return { type: v.type, id: v.id };
  if (typeof v === 'object' && v !== null && '__entity' in v && isUidShape((v as { __entity: unknown }).__entity)) {
    const u = (v as { __entity: EntityUid }).__entity;
    return { type: u.type, id: u.id };
  }
  return undefined;
}

/**
 * Adds to `out` the key of every entity a JSON value may refer to: `__entity` escapes, and bare
 * `{type, id}` records (with a schema Cedar reads those as entity references too; taking one that
 * is really a record only adds an entity to the slice, never changes a decision).
 */
export function collectEntityRefs(value: unknown, out: Set<string>): void {
  if (typeof value !== 'object' || value === null) return;
  const uid = asEntityUid(value);
  if (uid) {
    out.add(entityKey(uid));
    return;
  }
  if (Array.isArray(value)) {
    for (const v of value) collectEntityRefs(v, out);
    return;
  }
  for (const v of Object.values(value)) collectEntityRefs(v, out);
}

interface StoredEntity {
  record: EntityRecord;
  refs: string[];
}

/**
 * The site's entity data, indexed for slicing. Passing all entities to Cedar on every decision would
 * make each one cost in proportion to the data (thousands of entities are serialized into the
 * Wasm module per call); a decision can only read entities reachable from its principal, action,
 * resource, context and the entity literals of the policies, through parents and entity-valued
 * attributes, so only that slice is passed.
 */
export class EntityStore {
  private readonly byKey = new Map<string, StoredEntity>();

  /** `entities` must already have passed Cedar's checks (see policy-set-loader.ts). Throws on a duplicate uid. */
  constructor(entities: EntityRecord[]) {
    for (const record of entities) {
      const key = entityKey(record.uid);
      if (this.byKey.has(key)) throw new Error(`entity ${key} appears twice`);
      this.byKey.set(key, { record, refs: EntityStore.refsOf(record) });
    }
  }

  private static refsOf(record: EntityRecord): string[] {
    const refs = new Set<string>(record.parents.map(entityKey));
    collectEntityRefs(record.attrs, refs);
    if (record.tags) collectEntityRefs(record.tags, refs);
    return [...refs];
  }

  get size(): number {
    return this.byKey.size;
  }

  get(key: string): EntityRecord | undefined {
    return this.byKey.get(key)?.record;
  }

  /**
   * Keys of every stored entity reachable from `roots` (roots included when stored), walking
   * parents and entity references. `visited` is extended in place, so a caller can pass a set
   * already holding a precomputed closure to skip it.
   */
  closure(roots: Iterable<string>, visited: Set<string> = new Set()): Set<string> {
    const stack = [...roots];
    while (stack.length > 0) {
      const key = stack.pop()!;
      if (visited.has(key)) continue;
      const stored = this.byKey.get(key);
      if (!stored) continue;
      visited.add(key);
      for (const ref of stored.refs) if (!visited.has(ref)) stack.push(ref);
    }
    return visited;
  }

  /** Every entity, for tools that need the whole set. */
  all(): EntityRecord[] {
    return [...this.byKey.values()].map((s) => s.record);
  }
}

/**
 * Normalizes one entity of an entities file (already accepted by Cedar) to {@link EntityRecord}.
 * Returns undefined when its shape is not the Cedar JSON entity format.
 */
export function toEntityRecord(raw: unknown): EntityRecord | undefined {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return undefined;
  const o = raw as Record<string, unknown>;
  const uid = asEntityUid(o.uid);
  if (!uid) return undefined;
  const parents = Array.isArray(o.parents) ? o.parents.map(asEntityUid) : [];
  if (parents.some((p) => p === undefined)) return undefined;
  const attrs = typeof o.attrs === 'object' && o.attrs !== null ? (o.attrs as Record<string, unknown>) : {};
  const record: EntityRecord = { uid, attrs, parents: parents as EntityUid[] };
  if (typeof o.tags === 'object' && o.tags !== null) record.tags = o.tags as Record<string, unknown>;
  return record;
}
