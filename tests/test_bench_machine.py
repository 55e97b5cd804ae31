"""bench/machine.py reads the CPU model and ISA flags the benches print."""
from bench.machine import cpu_info, describe_machine


def test_cpu_info_reads_model_and_isa_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 fma avx512f amx_tile\n\n"
                       "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    info = cpu_info(str(cpuinfo))
    assert info["model"] == "Test CPU 9000"
    assert info["isa"]["AVX-512"] and info["isa"]["AMX"] and info["isa"]["AVX2"]
    assert not info["isa"]["AVX-512 BF16"] and not info["isa"]["AMX BF16"]
    assert describe_machine().startswith("CPU: ") and "AVX-512 BF16 " in describe_machine()
