"""
A fake of HAProxy's runtime API for unit tests: it answers the commands the
rolling upgrade uses with the text HAProxy 2.6 sends (captured from a real
one), keeps each server's administrative state, sessions and health, and
runs health checks on a clock.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import Factory, define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory as ProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall

from migrate._rolling._haproxy import HAProxyUnreachable

__all__ = [
    "FakeHAProxy",
    "FakeServer",
    "RuntimeAPIServer",
    "SERVERS_STATE_ANSWER",
    "STAT_ANSWER",
    "STAT_HEADER",
]

#: the header line of C{show stat} in HAProxy 2.6
STAT_HEADER = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,"
    "eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,"
    "qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,"
    "check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,"
    "hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,"
    "comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,"
    "rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,"
    "check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,"
    "cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,"
    "connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,"
    "rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,"
    "need_conn_est,uweight,agg_server_status,agg_server_check_status,"
    "agg_check_status,-,ssl_sess,ssl_reused_sess,ssl_failed_handshake,"
    "h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,"
    "h2_goaway_rcvd,h2_detected_conn_protocol_errors,"
    "h2_detected_strm_protocol_errors,h2_rst_stream_resp,h2_goaway_resp,"
    "h2_open_connections,h2_backend_open_streams,h2_total_connections,"
    "h2_backend_total_streams,h1_open_connections,h1_open_streams,"
    "h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,"
    "h1_spliced_bytes_in,h1_spliced_bytes_out,"
)

#: C{show stat app 4 -1} from a real HAProxy 2.6: s1 drained and up, s2 down
STAT_ANSWER = (
    STAT_HEADER + "\n"
    "app,s1,0,0,0,0,,0,0,0,,0,,0,0,0,0,DRAIN,1,1,0,1,4,0,1,,1,3,1,,0,,2,0,,0,L4OK,"
    ",0,,,,,,,,,,,0,0,,,,,-1,,,0,0,0,0,,,,Layer4 check passed,,2,2,3,,,,"
    "127.0.0.1:19081,,tcp,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,"
    ",,,,,,,,,,,,,\n"
    "app,s2,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,3,3,156,156,,1,3,2,,0,,2,0,,0,"
    "L4CON,,0,,,,,,,,,,,0,0,,,,,-1,Connection refused at initial connection step "
    "of tcp-check,,0,0,0,0,,,,Layer4 connection problem,,2,2,0,,,,127.0.0.1:19082"
    ",,tcp,,,,,,,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\n"
    "\n"
)

_SERVERS_STATE_HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state "
    "srv_uweight srv_iweight srv_time_since_last_change srv_check_status "
    "srv_check_result srv_check_health srv_check_state srv_agent_state "
    "bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl "
    "srv_check_port srv_check_addr srv_agent_addr srv_agent_port"
)

#: C{show servers state app} from a real HAProxy 2.6, same moment
SERVERS_STATE_ANSWER = (
    "1\n" + _SERVERS_STATE_HEADER + "\n"
    "3 app 1 s1 127.0.0.1 2 8 1 1 0 6 3 3 6 0 0 0 - 19081 - 0 0 - - 0\n"
    "3 app 2 s2 127.0.0.1 0 0 1 1 156 8 2 0 6 0 0 0 - 19082 - 0 0 - - 0\n"
    "\n"
)

_STAT_COLUMNS = STAT_HEADER[2:].split(",")


@define
class FakeServer:
    """
    One server as the fake HAProxy sees it.

    @ivar healthy: what its health check would find now.
    @ivar health: the health counter (0 .. rise + fall - 1).
    @ivar admin: C{"ready"}, C{"drain"} or C{"maint"}.
    @ivar checked: whether it has a health check.
    """

    name: str
    sessions: int = 0
    healthy: bool = True
    rise: int = 2
    fall: int = 2
    health: int = -1
    admin: str = "ready"
    checked: bool = True

    def __attrs_post_init__(self) -> None:
        if self.health < 0:
            self.health = self.rise + self.fall - 1 if self.healthy else 0

    @property
    def running(self) -> bool:
        return self.health >= self.rise if self.checked else True

    @property
    def status(self) -> str:
        if self.admin == "maint":
            return "MAINT"
        if not self.checked:
            return "no check"
        top = self.rise + self.fall - 1
        if not self.running:
            if self.health == 0:
                return "DOWN"
            return "DOWN {}/{}".format(self.health, self.rise)
        if self.health < top:
            return "UP {}/{}".format(self.health - self.rise + 1, self.fall)
        return "DRAIN" if self.admin == "drain" else "UP"

    def check(self) -> None:
        """
        One health check.
        """
        if not self.checked or self.admin == "maint":
            return
        top = self.rise + self.fall - 1
        if self.healthy:
            self.health = min(top, self.health + 1)
            if self.health == self.rise:
                # Going up: HAProxy jumps to the top of the range.
                self.health = top
        else:
            self.health = max(0, self.health - 1)
            if self.health < self.rise:
                self.health = 0

    def statRow(self, backend: str) -> str:
        values = dict.fromkeys(_STAT_COLUMNS, "")
        top = self.rise + self.fall - 1
        values.update(
            {
                "pxname": backend,
                "svname": self.name,
                "scur": str(self.sessions),
                "status": self.status,
                "type": "2",
                "addr": "127.0.0.1:1",
            }
        )
        if self.checked and self.admin != "maint":
            values.update(
                {
                    "check_status": "L4OK" if self.healthy else "L4CON",
                    "check_desc": (
                        "Layer4 check passed"
                        if self.healthy
                        else "Layer4 connection problem"
                    ),
                    "check_rise": str(self.rise),
                    "check_fall": str(self.fall),
                    "check_health": str(min(self.health, top)),
                }
            )
        return ",".join(values[column] for column in _STAT_COLUMNS)

    def stateRow(self, backend: str, index: int) -> str:
        admin = {"ready": 0, "drain": 8, "maint": 1}[self.admin]
        operational = 2 if self.running else 0
        return "3 {} {} {} 127.0.0.1 {} {} 1 1 0 6 3 3 6 0 0 0 - 1 - 0 0 - - 0".format(
            backend, index, self.name, operational, admin
        )


@define
class FakeHAProxy:
    """
    A L{migrate._rolling._haproxy.RuntimeAPI} answering like HAProxy 2.6.

    @ivar backends: servers by backend name.
    @ivar commands: every command received, in order.
    @ivar overrides: answers to send instead, by command.
    @ivar unreachable: fail every command with L{HAProxyUnreachable}.
    @ivar onCommand: called with each command before it is answered.
    @ivar level: C{"admin"}, or anything else to refuse C{set} commands.
    """

    backends: dict[str, list[FakeServer]] = Factory(dict)
    commands: list[str] = Factory(list)
    overrides: dict[str, str] = Factory(dict)
    unreachable: bool = False
    onCommand: Callable[[str], None] = lambda command: None
    level: str = "admin"
    _checks: LoopingCall | None = field(default=None, init=False)

    def server(self, backend: str, name: str) -> FakeServer:
        for each in self.backends[backend]:
            if each.name == name:
                return each
        raise KeyError(name)

    def startChecks(self, clock: Any, interval: float = 0.2) -> None:
        """
        Run every server's health check every C{interval} seconds on
        C{clock}.
        """
        self._checks = LoopingCall(self.runChecks)
        self._checks.clock = clock
        self._checks.start(interval, now=False)

    def stopChecks(self) -> None:
        if self._checks is not None and self._checks.running:
            self._checks.stop()

    def runChecks(self) -> None:
        for servers in self.backends.values():
            for each in servers:
                each.check()

    def command(self, line: str) -> Deferred[str]:
        self.commands.append(line)
        self.onCommand(line)
        if self.unreachable:
            return fail(HAProxyUnreachable("cannot reach HAProxy's stats socket"))
        if line in self.overrides:
            return succeed(self.overrides[line])
        return succeed(self.answer(line))

    def answer(self, line: str) -> str:
        words = line.split()
        if words[:2] == ["show", "stat"] and len(words) == 5:
            servers = self.backends.get(words[2])
            if servers is None:
                return "No such proxy.\n\n"
            rows = [each.statRow(words[2]) for each in servers]
            return STAT_HEADER + "\n" + "".join(row + "\n" for row in rows) + "\n"
        if words[:3] == ["show", "servers", "state"] and len(words) == 4:
            servers = self.backends.get(words[3])
            if servers is None:
                return "Can't find backend.\n\n"
            rows = [
                each.stateRow(words[3], index) for index, each in enumerate(servers, 1)
            ]
            return (
                "1\n"
                + _SERVERS_STATE_HEADER
                + "\n"
                + "".join(row + "\n" for row in rows)
                + "\n"
            )
        if words[:2] == ["set", "server"] and len(words) == 5:
            if self.level != "admin":
                return "Permission denied\n\n"
            backend, slash, name = words[2].partition("/")
            if not slash:
                return "Require 'backend/server'.\n\n"
            if backend not in self.backends:
                return "No such backend.\n\n"
            try:
                server = self.server(backend, name)
            except KeyError:
                return "No such server.\n\n"
            if words[3] == "state":
                if words[4] not in ("ready", "drain", "maint"):
                    return (
                        "'set server <srv> state' expects 'ready', 'drain' "
                        "and 'maint'.\n\n"
                    )
                leaving = server.admin == "maint" and words[4] != "maint"
                server.admin = words[4]
                if leaving and server.checked:
                    # HAProxy: "start OK but check immediately".
                    server.health = server.rise + server.fall - 1
                return "\n"
            if words[3] == "health" and words[4] in ("up", "down", "stopping"):
                if words[4] == "down":
                    server.health = 0
                elif words[4] == "up":
                    server.health = server.rise + server.fall - 1
                return "\n"
        return "Unknown command, but maybe one of the following ones is a better match:\n\n"


class _AnswerOnce(Protocol):
    """
    One runtime API connection: read a line, answer, close.
    """

    def __init__(self, api: "RuntimeAPIServer") -> None:
        self.api = api
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in self.buffer:
            return
        line = self.buffer.split(b"\n", 1)[0].decode("utf-8")
        self.api.received.append(line)
        if self.api.silent:
            return
        answer = self.api.fake.answer(line)
        self.transport.write(answer.encode("utf-8"))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


@define
class RuntimeAPIServer:
    """
    A protocol factory serving a L{FakeHAProxy} the way HAProxy's stats
    socket does (non-interactive: one command per connection).

    @ivar silent: read commands but never answer.
    """

    fake: FakeHAProxy
    received: list[str] = Factory(list)
    silent: bool = False

    def factory(self) -> ProtocolFactory:
        return ProtocolFactory.forProtocol(lambda: _AnswerOnce(self))
