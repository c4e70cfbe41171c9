"""Run by `make check-py38-runtime` under Python 3.8 with the last 3.8 releases of grpcio (1.70)
and protobuf (5.29): the committed generated code imports, and the edge's gRPC transport
exchanges messages with a real server. (No torch: the rest of the edge is checked by vermin.)"""

import sys
from concurrent import futures

import grpc
from google.protobuf import __version__ as protobuf_version

from sft_common.proto import sft_pb2 as pb
from sft_common.proto import sft_pb2_grpc as pb_grpc
from sft_edge.link.transport import GrpcTransport, open_channel


class Echo(pb_grpc.SplitTrainerServicer):
    def Train(self, request_iterator, context):
        for msg in request_iterator:
            yield pb.CloudMessage(train=pb.TrainReply(step=msg.train.step, loss=0.5))


def main() -> int:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_SplitTrainerServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        t = GrpcTransport(open_channel(f"127.0.0.1:{port}", connect_timeout=10), timeout=10)
        reply = t.call(pb.EdgeMessage(train=pb.TrainStep(step=3)))
        t.close()
    finally:
        server.stop(0)
    assert reply.train.step == 3 and reply.train.loss == 0.5, reply
    print(f"ok: Python {sys.version.split()[0]}, grpcio {grpc.__version__}, protobuf {protobuf_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
