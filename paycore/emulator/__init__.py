"""An emulator of the challenge's payment processor (see SPEC section 2).

Command line: python -m paycore.emulator --host 127.0.0.1 --port 8001 --fee 0.07

In-process:
    processor = PaymentProcessor(ProcessorConfig(fee=Decimal("0.07")))
    server = await processor.serve("127.0.0.1", 0)   # an asyncio.Server
    processor.config.delay_ms = 100; processor.store.totals(None, None)

As a child process:
    with EmulatorProcess("--fee", "0.07", "--delay", "10") as emulator:
        emulator.url   # http://127.0.0.1:<free port>
"""
from paycore.emulator.config import ProcessorConfig
from paycore.emulator.process import EmulatorProcess
from paycore.emulator.processor import PaymentProcessor
from paycore.emulator.store import PaymentStore

__all__ = ["EmulatorProcess", "PaymentProcessor", "PaymentStore", "ProcessorConfig"]
