import { rmSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { type AgentConfig, type JoseModule, loadGatewayMapping, loadJose } from '@burrow/agent';
import { makeTempDir } from './pki-fixture';
import { AUD, ISS, jwksOf, makeKey, signToken, type TestKey } from './token-fixture';

/** The package-proxy example (issue 17): mapping, policies, entities, schema. */
export const PACKAGE_PROXY_DIR = path.resolve(__dirname, '..', '..', '..', 'examples', 'package-proxy');

/**
 * A site that answers gateway checks the way examples/package-proxy says (token required, pulls of
 * trusted packages allowed, young ones quarantined, known-malicious ones denied), with a signing
 * key made at test time and its JWKS in a file: the agent config overrides for {@link Stack}.
 */
export class GatewaySite {
  private constructor(
    readonly dir: string,
    private readonly jose: JoseModule,
    private readonly key: TestKey,
  ) {}

  static async create(): Promise<GatewaySite> {
    const dir = makeTempDir('burrow-gateway-');
    const jose = await loadJose();
    const key = await makeKey(jose, 'ES256', 'site-key-1');
    writeFileSync(path.join(dir, 'jwks.json'), jwksOf(key));
    return new GatewaySite(dir, jose, key);
  }

  /** The agent's token verifier, policies and gateway mapping. */
  agentConfig(): Partial<AgentConfig> {
    return {
      authn: { jwksFile: path.join(this.dir, 'jwks.json'), issuers: [ISS], audiences: [AUD] },
      policy: {
        policiesDir: path.join(PACKAGE_PROXY_DIR, 'policies'),
        entitiesFile: path.join(PACKAGE_PROXY_DIR, 'entities.json'),
        schemaFile: path.join(PACKAGE_PROXY_DIR, 'schema.cedarschema'),
        cacheTtlMs: 0,
        auditLog: path.join(this.dir, 'audit.jsonl'),
      },
      gatewayMapping: loadGatewayMapping(path.join(PACKAGE_PROXY_DIR, 'gateway-mapping.conf')),
    };
  }

  /** A token of `sub` valid for 10 minutes, or one that expired a minute ago. */
  token(sub = 'alice', opts: { expired?: boolean } = {}): Promise<string> {
    const nowS = Math.floor(Date.now() / 1000);
    const times = opts.expired ? { iat: nowS - 700, exp: nowS - 60 } : {};
    return signToken(this.jose, this.key, { sub, ...times });
  }

  cleanup(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}
