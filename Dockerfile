# Builds the three Backhaul binaries (server, client, cli) into one small runtime image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && cp target/release/server target/release/client target/release/cli /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home backhaul
COPY --from=build /usr/local/bin/server /usr/local/bin/client /usr/local/bin/cli /usr/local/bin/
USER backhaul
WORKDIR /home/backhaul
