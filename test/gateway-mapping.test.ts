import { expect } from 'chai';
import * as path from 'node:path';
import { GatewayMappingError, loadGatewayMapping, parseGatewayMapping, type GatewayMapping } from '@burrow/agent';

const FILE = 'gw.conf';
const HEAD = ['token required', 'subject.type User', 'subject.id claim:sub', 'default deny'];

const parse = (...lines: string[]): GatewayMapping => parseGatewayMapping(lines.join('\n'), FILE);

/** The error of parsing `lines`; fails the test when they parse. */
function errorOf(...lines: string[]): GatewayMappingError {
  try {
    parse(...lines);
  } catch (err) {
    expect(err).to.be.instanceOf(GatewayMappingError);
    return err as GatewayMappingError;
  }
  throw new Error(`parsed: ${lines.join(' | ')}`);
}

/**
 * The gateway mapping file (docs/gateways.md): every directive, and every error as FILE:LINE:
 * problem with the line it is on.
 */
describe('gateway mapping parser', () => {
  it('reads every directive, comments and blank lines aside', () => {
    const m = parse(
      '# a package proxy',
      '',
      'token optional   # anonymous pulls allowed',
      'anonymous User::"anonymous"',
      'subject.type claim:typ',
      'subject.id claim:sub',
      'subject.property groups claim:groups',
      'subject.property tenant claim:org.tenant',
      'route GET,head /packages/{registry}/{name} action=pull resource=Package::"{registry}/{name}"',
      'route * /admin/* action=admin resource=Route::"{path}"',
      'route POST /files/{rest*} action="upload file" resource=File::"{rest}"',
      'default action={method} resource=Route::"{host}{path}"',
      'context.tenant header:X-Tenant',
      'context.age header:x-age as long',
      'context.beta query:beta as bool',
      'context.gateway extension:gateway',
      'context.client source_principal',
      'context.registry param:registry',
      'context.label "a # b: c"',
      'header x-burrow-groups claim:groups',
    );
    expect(m.token).to.equal('optional');
    expect(m.anonymous).to.deep.equal({ type: 'User', id: 'anonymous' });
    expect(m.subjectType).to.deep.equal({ kind: 'claim', name: 'typ', path: ['typ'] });
    expect(m.subjectProperties.map((p) => [p.name, p.source])).to.deep.equal([
      ['groups', { kind: 'claim', name: 'groups', path: ['groups'] }],
      ['tenant', { kind: 'claim', name: 'org.tenant', path: ['org', 'tenant'] }],
    ]);
    expect(m.routes.map((r) => [r.methods, r.pattern.source, r.line])).to.deep.equal([
      [['GET', 'HEAD'], '/packages/{registry}/{name}', 9],
      [[], '/admin/*', 10],
      [['POST'], '/files/{rest*}', 11],
    ]);
    expect(m.routes[2]!.action.source).to.equal('upload file');
    expect(m.routes[0]!.resource.type).to.equal('Package');
    expect(m.fallback).to.not.equal('deny');
    expect(m.context.map((c) => [c.name, c.source.kind, c.as])).to.deep.equal([
      ['tenant', 'header', 'string'],
      ['age', 'header', 'long'],
      ['beta', 'query', 'bool'],
      ['gateway', 'extension', 'string'],
      ['client', 'request', 'string'],
      ['registry', 'param', 'string'],
      ['label', 'literal', 'string'],
    ]);
    expect(m.context[0]!.source, 'header names are lower-cased').to.deep.equal({ kind: 'header', name: 'x-tenant' });
    expect(m.context[6]!.source).to.deep.equal({ kind: 'literal', value: 'a # b: c' });
    expect(m.headers.map((h) => h.name)).to.deep.equal(['x-burrow-groups']);
  });

  it('a namespaced type is a literal; a colon elsewhere needs quotes', () => {
    const m = parse('token required', 'subject.type Acme::User', 'subject.id claim:sub', 'default deny');
    expect(m.subjectType).to.deep.equal({ kind: 'literal', value: 'Acme::User' });
    expect(errorOf(...HEAD, 'context.a urn:x').message).to.include('quote it when it has a colon');
  });

  it('reads the shipped example (examples/package-proxy/gateway-mapping.conf)', () => {
    const file = path.resolve(__dirname, '..', '..', 'examples', 'package-proxy', 'gateway-mapping.conf');
    const m = loadGatewayMapping(file);
    expect(m.token).to.equal('required');
    expect(m.routes).to.have.length(1);
    expect(m.fallback).to.equal('deny');
  });

  const cases: [string, string[], number, string][] = [
    ['an unknown directive', [...HEAD, 'subjct.id claim:sub'], 5, 'unknown directive "subjct.id"'],
    ['a directive named like an object property', [...HEAD, 'constructor x'], 5, 'unknown directive "constructor"'],
    ['a bad token mode', ['token maybe', ...HEAD.slice(1)], 1, 'token must be required, optional or none'],
    ['a duplicate single directive', [...HEAD, 'subject.id claim:email'], 5, 'duplicate subject.id (first on line 3)'],
    [
      'a duplicate context entry',
      [...HEAD, 'context.a header:x-a', 'context.a header:x-b'],
      6,
      'duplicate context.a (first on line 5)',
    ],
    [
      'a duplicate header',
      [...HEAD, 'header x-burrow-a claim:a', 'header X-Burrow-A claim:b'],
      6,
      'duplicate header x-burrow-a',
    ],
    [
      'a duplicate route',
      [...HEAD, 'route GET /a action=r resource=R::"a"', 'route GET /a action=w resource=R::"a"'],
      6,
      'duplicate route GET /a (first on line 5)',
    ],
    [
      'a template naming an unknown placeholder',
      [...HEAD, 'route GET /p/{name} action=pull resource=Package::"{nmae}"'],
      5,
      'uses {nmae}, which is not one of {method}, {host}, {path}, {name}',
    ],
    ['an unbalanced template', [...HEAD.slice(0, 3), 'default action={method resource=R::"x"'], 4, 'without its "}"'],
    [
      'a parameter that is part of a segment',
      [...HEAD, 'route GET /p/{name}.tgz action=a resource=R::"x"'],
      5,
      'a parameter is a whole segment',
    ],
    ['a rest pattern not last', [...HEAD, 'route GET /*/x action=a resource=R::"x"'], 5, 'must come last'],
    ['a pattern not starting with /', [...HEAD, 'route GET p action=a resource=R::"x"'], 5, 'must start with "/"'],
    ['a route parameter named path', [...HEAD, 'route GET /{path} action=a resource=R::"x"'], 5, 'reserved'],
    ['a route without resource', [...HEAD, 'route GET /a action=a'], 5, 'route needs action=... and resource='],
    ['a resource that is no entity', [...HEAD, 'route GET /a action=a resource=x'], 5, 'is not Type::"id template"'],
    ['an unknown route option', [...HEAD, 'route GET /a action=a resource=R::"a" mode=x'], 5, '"mode=x" is not'],
    ['a bad method', [...HEAD, 'route G:T /a action=a resource=R::"a"'], 5, '"G:T" is not an HTTP method'],
    ['an unknown source', [...HEAD, 'context.a cookie:x'], 5, 'unknown source "cookie:x"'],
    ['a bad type', [...HEAD, 'context.a header:x as int'], 5, '"as int" is not one of'],
    ['a reserved context name', [...HEAD, 'context.action_properties header:x'], 5, 'reserved'],
    ['a bad context name', [...HEAD, 'context.a-b header:x'], 5, 'is not a context name'],
    ['a reserved header', [...HEAD, 'header x-burrow-subject claim:sub'], 5, 'set by Burrow itself'],
    ['a header outside x-burrow-', [...HEAD, 'header authorization claim:sub'], 5, 'start with x-burrow-'],
    ['a typed header', [...HEAD, 'header x-burrow-age header:age as long'], 5, 'no "as"'],
    ['an unclosed quote', [...HEAD, 'context.a "open'], 5, 'quoted string is not closed'],
    ['a subject type that is no type', ['token required', 'subject.type "a b"', ...HEAD.slice(2)], 2, 'not a Cedar'],
    ['anonymous with token required', [...HEAD, 'anonymous User::"anon"'], 5, 'only with token optional'],
    ['token optional without anonymous', ['token optional', ...HEAD.slice(1)], 1, 'needs an anonymous directive'],
    [
      'claims with token none',
      ['token none', 'subject.type User', 'subject.id claim:sub', 'default deny'],
      3,
      'token none',
    ],
    ['a missing token directive', HEAD.slice(1), 0, 'missing required directive token'],
    ['a missing subject.id', [HEAD[0]!, HEAD[1]!, HEAD[3]!], 0, 'missing required directive subject.id'],
    ['a missing default', HEAD.slice(0, 3), 0, 'missing required directive default'],
  ];
  for (const [what, lines, line, text] of cases) {
    it(`refuses ${what}: ${FILE}:${line || '-'}: ...`, () => {
      const err = errorOf(...lines);
      expect(err.line, err.message).to.equal(line);
      expect(err.message).to.include(text);
      expect(err.message.startsWith(line > 0 ? `${FILE}:${line}: ` : `${FILE}: `), err.message).to.equal(true);
      expect(err.message).to.not.include('\n');
    });
  }

  it('an unreadable file is one line naming it', () => {
    expect(() => loadGatewayMapping('/nonexistent/gw.conf')).to.throw(
      GatewayMappingError,
      /^\/nonexistent\/gw\.conf: cannot read the gateway mapping: /,
    );
  });
});
