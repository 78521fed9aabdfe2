import type * as protobuf from 'protobufjs';
import { loadProto } from '@burrow/tunnel';

/**
 * Message types of a .proto under proto/ (imports resolved there too), by full name, for the
 * gateway listeners' per-check encoding: protobufjs' generated coders on plain objects, without
 * the JSON-shape conversion of the API codec.
 */
export function loadProtoTypes(file: string, names: readonly string[]): Map<string, protobuf.Type> {
  const root = loadProto(file, { keepCase: true });
  root.resolveAll();
  return new Map(names.map((name) => [name, root.lookupType(name)]));
}
