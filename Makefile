# Burrow: the two front-door commands are `make demo` and `make test`; both start from `make build`.
SHELL := /bin/bash
NPM ?= npm
MOCHA := node_modules/.bin/mocha

.PHONY: all install build test demo clean

all: build

# Installs exactly what package-lock.json pins (npm ci) when a lockfile exists.
node_modules/.package-lock.json: package.json package-lock.json packages/*/package.json
	$(NPM) ci --no-audit --no-fund
	@touch $@

install: node_modules/.package-lock.json

build: install
	node_modules/.bin/tsc -b tsconfig.json
	chmod +x packages/*/dist/cli.js
	@# npm links workspace bins only when their target exists; the first install ran before tsc.
	@test -L node_modules/.bin/burrow-agent -a -L node_modules/.bin/burrow-broker -a -L node_modules/.bin/burrow-pki \
	  || $(NPM) rebuild --ignore-scripts --workspaces >/dev/null

test: build
	$(MOCHA)

demo: build
	node scripts/demo.js

clean:
	rm -rf node_modules packages/*/dist packages/*/tsconfig.tsbuildinfo test/dist test/tsconfig.tsbuildinfo
