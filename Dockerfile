# Production GPU image of kaem-serve: NVIDIA Triton Inference Server 2.51 (NGC 24.10, the same
# release as the local binary that nvidia-pytriton ships) serving model_repository/ with the NATIVE
# onnxruntime backend (the local CPU shim from serving/local/launcher.py is not used here).
#
# Export BEFORE building: the model.onnx files under model_repository/<model>/<version>/ are written
# by `python export/to_onnx.py ...` and are not committed; the image bakes in whatever is there.
#   docker build -t kaem-serve .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 kaem-serve
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# Same repository layout and path convention as `kaem-serve --model-repository model_repository`.
COPY model_repository/ /models/

# The startup probe's warm-up (deploy/k8s/deployment.yaml): one gRPC inference per model before the pod takes
# traffic, as kaem-serve sends locally. Standalone: the standard library, numpy and tritonclient (the client
# release the project pins in constraints.txt).
RUN python3 -m pip install --no-cache-dir "tritonclient[grpc]==2.73.0"
COPY serving/warmup.py /opt/kaem/warmup.py
# The Deployment's init container: refuses a repository whose model files differ from the sha256 their export
# recorded in config.pbtxt (the native backend would load any file that parses). By hand:
#   docker run --rm kaem-serve python3 /opt/kaem/verify_repository.py /models
COPY serving/verify_repository.py /opt/kaem/verify_repository.py

# Unprivileged: the base image's `triton-server` user (uid 1000). Numeric, so Kubernetes'
# runAsNonRoot can verify it; the server only reads /models.
USER 1000:1000

# HTTP/REST, gRPC, Prometheus metrics.
EXPOSE 8000 8001 8002

# Ready = server up AND every model loaded (strict readiness). python3 is in the base image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2); sys.exit(r.status != 200)"]

# Serve exactly the rendered config (no auto-completion), with p50/p90/p99 latency summaries, drain for 5 s on
# SIGTERM, load the baked repository once: serving/local/launcher.py SERVING_ARGS + model_control_args("none"),
# the same flags `kaem-serve` passes (tests/test_dockerfile.py). A repository on a volume or object storage that
# should pick up exports and rollbacks: --model-control-mode=poll --repository-poll-secs=N.
CMD ["tritonserver", \
     "--model-repository=/models", \
     "--disable-auto-complete-config", \
     "--exit-timeout-secs=5", \
     "--metrics-config=summary_latencies=true", \
     "--metrics-config=summary_quantiles=0.5:0.05,0.9:0.01,0.99:0.001", \
     "--cache-config=local,size=67108864", \
     "--model-control-mode=none"]
