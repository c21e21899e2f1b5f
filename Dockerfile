# Multi-stage build of the pollcast binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pollcast

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/pollcast pollcast \
 && mkdir -p /var/lib/pollcast /etc/pollcast \
 && chown pollcast /var/lib/pollcast
COPY --from=build /src/target/release/pollcast /usr/local/bin/pollcast
COPY config.toml /etc/pollcast/config.toml
USER pollcast
WORKDIR /var/lib/pollcast
ENV POLLCAST__HTTP__ADDR=0.0.0.0:8080
EXPOSE 8080
VOLUME /var/lib/pollcast
ENTRYPOINT ["pollcast", "--config", "/etc/pollcast/config.toml"]
