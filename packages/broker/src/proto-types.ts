import * as path from 'node:path';
import * as protobuf from 'protobufjs';
import { PROTO_DIR } from '@burrow/tunnel';

/**
 * Message types of a .proto under proto/ (imports resolved there too), by full name, for the
 * gateway listeners' per-check encoding: protobufjs' generated coders on plain objects, without
 * the JSON-shape conversion of the API codec.
 */
export function loadProtoTypes(file: string, names: readonly string[]): Map<string, protobuf.Type> {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(PROTO_DIR, target);
  root.loadSync(file, { keepCase: true });
  root.resolveAll();
  return new Map(names.map((name) => [name, root.lookupType(name)]));
}
