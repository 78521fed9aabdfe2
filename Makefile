# Burrow: the two front-door commands are `make demo` and `make test`; both start from `make build`.
SHELL := /bin/bash
NPM ?= npm
MOCHA := node_modules/.bin/mocha

.PHONY: all install build lint format test demo bench clean agent-binary

all: build

# Installs exactly what package-lock.json pins (npm ci) when a lockfile exists.
node_modules/.package-lock.json: package.json package-lock.json packages/*/package.json
	$(NPM) ci --no-audit --no-fund
	@touch $@

install: node_modules/.package-lock.json

build: install
	node_modules/.bin/tsc -b tsconfig.json
	chmod +x packages/*/dist/cli.js
	@# @burrow/client's main and bin are bundles (so its tarball installs with no other @burrow/* package).
	node scripts/bundle-client.js
	@# npm links workspace bins only when their target exists; the first install ran before tsc.
	@test -L node_modules/.bin/burrow-agent -a -L node_modules/.bin/burrow-broker -a -L node_modules/.bin/burrow-pki \
	  -a -L node_modules/.bin/burrow-call \
	  || $(NPM) rebuild --ignore-scripts --workspaces >/dev/null

# Formatting and lint rules (biome.jsonc) are checked, never fixed, here: `make format` fixes. The line-length
# check catches what the formatter cannot wrap: strings, template literals and comments over 120 columns.
lint: install
	node_modules/.bin/biome ci --error-on-warnings --colors=off .
	node scripts/check-line-length.js

format: install
	node_modules/.bin/biome check --write .

test: build lint
	$(MOCHA)

demo: build
	node scripts/demo.js

# Burrow next to direct gRPC and an ssh reverse tunnel (bench/run.js): quick profile by default,
# BENCH_PROFILE=full for 10,000 agents. Writes bench/results/latest.json and prints a table.
# The scale case holds one socket per agent in the broker and in the agent swarm processes.
bench: build
	ulimit -n 65536 2>/dev/null || ulimit -n $$(ulimit -Hn); node bench/run.js

# The agent as one executable for air-gapped sites (docs/install-air-gapped.md): Node single
# executable with the bundle, the protos and the Cedar wasm inside, plus its .sha256.
AGENT_BINARY := dist/burrow-agent-linux-x64
AGENT_BINARY_INPUTS := $(shell find packages/*/src proto -type f) packages/*/package.json package-lock.json scripts/build-agent-binary.js $(realpath $(shell command -v node))

agent-binary: $(AGENT_BINARY)

$(AGENT_BINARY): $(AGENT_BINARY_INPUTS) | build
	node scripts/build-agent-binary.js

clean:
	rm -rf dist node_modules packages/*/dist packages/client/bundle packages/client/proto packages/*/tsconfig.tsbuildinfo test/dist test/tsconfig.tsbuildinfo
