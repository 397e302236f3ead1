// Command vigil-test-kubelet is a TEST-ONLY stand-in for a kubelet, for Vigil's Kubernetes
// gateway tests (deploy/dev/kube.sh). It serves the kubelet's streaming endpoints for one pod
// (by default default/shell, container "shell") over HTTPS:
//
//	/exec/{namespace}/{pod}[/{uid}]/{container}?command=...   (the apiserver's pods/exec)
//	/attach/{namespace}/{pod}[/{uid}]/{container}             (pods/attach)
//	/portForward/{namespace}/{pod}[/{uid}]                     (pods/portforward)
//	/containerLogs/{namespace}/{pod}/{container}              (pods/log: the --log-file)
//	/healthz
//
// The streaming protocols (SPDY remotecommand v1..v4 with the exit-code status, port-forward,
// and the channel.k8s.io WebSocket protocols up to v4) are the real kubelet's own code, the
// packages k8s.io/kubernetes/pkg/kubelet/cri/streaming/{remotecommand,portforward} of the
// Kubernetes tree this is built in. That tree (1.20) predates v5.channel.k8s.io, the only
// WebSocket subprotocol kubectl 1.30 and later offer for exec and attach, so v5 is served here
// (serveV5: v4's channels and status, plus the close signal), on the tree's own WebSocket
// connection code. Only that and the "container runtime" below are ours; it has no container:
//
//   - exec runs the command ON THIS HOST, as the user the kubelet runs as (root under
//     kube.sh, which is acceptable for a dev/test harness on a throwaway machine) or, with
//     --run-as USER, as that user. With tty it gets a real pty (window resizes are honoured);
//     without, separate stdin/stdout/stderr pipes. The exit status is passed back (a signal
//     becomes 128+signal), so `kubectl exec shell -- sh -c 'exit 3'` exits 3.
//   - attach starts a new shell (--shell, "-i" added with a tty) rather than attaching to a
//     long-running process.
//   - port-forward connects to 127.0.0.1:PORT on this host.
//   - the container's log is the file --log-file: `kubectl logs` gets what it holds, and
//     `kubectl logs -f` (follow=true) gets that and then every byte appended to it, as it is
//     appended (polled every 50 ms, flushed at once), until the client goes away: a test
//     appends a line and sees when it arrives. A file cut shorter is read again from its start.
//
// Every exec and attach, and every connection a port-forward carries, appends one JSON line to
// --exec-log before it starts (once the client's streams are set up: a failed handshake runs
// and logs nothing):
//
//	{"time":"RFC3339Nano","kind":"exec","namespace":"default","pod":"shell","container":"shell",
//	 "command":["sh","-c","echo hi"],"tty":false,"stdin":true,"transport":"websocket"}
//	{"time":"...","kind":"attach",...same fields; command is the shell attach started...}
//	{"time":"...","kind":"portforward","namespace":"default","pod":"shell","port":8080}
//
// ("transport": "spdy" or "websocket", what the exec or attach request came on)
//
// and every request for the log one line when its answer ends, with the bytes it sent:
//
//	{"time":"...","kind":"logs","namespace":"default","pod":"shell","container":"shell",
//	 "follow":true,"bytes":123}
//
// That file is the ground truth of what ran and what was served.
//
// Only the apiserver may call it: clients must present a certificate signed by --client-ca
// (kube.sh gives the apiserver one with --kubelet-client-certificate).
//
// Build (what `deploy/dev/kube.sh install` does): this directory is copied to
// cmd/vigil-test-kubelet in the Debian kubernetes source tree and built there with that tree's
// own build, in GOPATH mode against its vendor/ directory:
//
//	GO111MODULE=off make WHAT=cmd/vigil-test-kubelet
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	"k8s.io/apiserver/pkg/util/wsstream"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/kubernetes/pkg/kubelet/cri/streaming/portforward"
	remotecommandserver "k8s.io/kubernetes/pkg/kubelet/cri/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

const (
	streamIdleTimeout = 4 * time.Hour
	// how long a finished command's output may still be drained (a background process that
	// keeps the pipes or the pty open must not hold the session forever)
	drainGrace = 2 * time.Second
)

// one line of the exec log, for exec and attach
type logEntry struct {
	Time      string   `json:"time"`
	Kind      string   `json:"kind"` // exec or attach
	Namespace string   `json:"namespace"`
	Pod       string   `json:"pod"`
	Container string   `json:"container"`
	Command   []string `json:"command"`
	TTY       bool     `json:"tty"`
	Stdin     bool     `json:"stdin"`
	Transport string   `json:"transport"` // spdy or websocket
}

// one line of the exec log, for a connection that a port-forward carries
type portForwardEntry struct {
	Time      string `json:"time"`
	Kind      string `json:"kind"` // portforward
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	Port      int32  `json:"port"`
}

// one line of the exec log, for a request for the container's log (written when it ends)
type logsEntry struct {
	Time      string `json:"time"`
	Kind      string `json:"kind"` // logs
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	Container string `json:"container"`
	Follow    bool   `json:"follow"`
	Bytes     int64  `json:"bytes"`
}

type host struct {
	namespace, pod, container string
	containerLog              string
	workdir                   string
	shell                     string
	cred                      *syscall.Credential
	runAsName                 string

	logMu   sync.Mutex
	logFile *os.File

	procMu sync.Mutex
	procs  map[int]struct{} // process group ids of running commands
}

func now() string { return time.Now().UTC().Format(time.RFC3339Nano) }

func (h *host) record(e interface{}) {
	var line bytes.Buffer
	enc := json.NewEncoder(&line) // one line, ending in \n
	enc.SetEscapeHTML(false)      // keep < > & of command lines as they are
	if err := enc.Encode(e); err != nil {
		log.Printf("exec log: %v", err)
		return
	}
	h.logMu.Lock()
	defer h.logMu.Unlock()
	if _, err := h.logFile.Write(line.Bytes()); err != nil {
		log.Printf("exec log: %v", err)
	}
}

func (h *host) env(tty bool) []string {
	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + h.workdir,
		"HOSTNAME=" + h.pod,
		"LANG=C.UTF-8",
	}
	if h.runAsName != "" {
		env = append(env, "USER="+h.runAsName, "LOGNAME="+h.runAsName)
	}
	if tty {
		env = append(env, "TERM=xterm")
	}
	return env
}

// streamHost is the host as one exec or attach request sees it: its exec log line names the
// transport the request came on.
type streamHost struct {
	*host
	transport string // spdy or websocket
}

func transportOf(r *http.Request) string {
	if wsstream.IsWebSocketRequest(r) {
		return "websocket"
	}
	return "spdy"
}

// ExecInContainer implements remotecommandserver.Executor.
// It is called once the client's streams are set up, so a handshake that fails (a WebSocket
// subprotocol not served: 403 from the WebSocket handshake) runs and logs nothing.
func (h streamHost) ExecInContainer(name string, uid types.UID, container string, cmd []string, in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, timeout time.Duration) error {
	h.record(logEntry{Time: now(), Kind: "exec", Namespace: h.namespace, Pod: name, Container: container, Command: cmd, TTY: tty, Stdin: in != nil, Transport: h.transport})
	return h.run(cmd, in, out, errOut, tty, resize)
}

// AttachContainer implements remotecommandserver.Attacher: a new shell, not an existing process.
func (h streamHost) AttachContainer(name string, uid types.UID, container string, in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	cmd := h.attachCommand(tty)
	h.record(logEntry{Time: now(), Kind: "attach", Namespace: h.namespace, Pod: name, Container: container, Command: cmd, TTY: tty, Stdin: in != nil, Transport: h.transport})
	return h.run(cmd, in, out, errOut, tty, resize)
}

// The WebSocket subprotocol of Kubernetes 1.30 and later, and its close signal: a message on
// channel 255 whose one byte names a channel its sender has closed (kubectl's stdin at EOF).
const (
	v5Protocol  = "v5.channel.k8s.io"
	closeSignal = 255
)

// The channels of channel.k8s.io, as the tree's remotecommand package numbers them.
const (
	stdinChannel = iota
	stdoutChannel
	stderrChannel
	errorChannel
	resizeChannel
)

// offersV5 tells whether r is a WebSocket request that offers v5.channel.k8s.io.
func offersV5(r *http.Request) bool {
	if !wsstream.IsWebSocketRequest(r) {
		return false
	}
	for _, header := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, offered := range strings.Split(header, ",") {
			if strings.TrimSpace(offered) == v5Protocol {
				return true
			}
		}
	}
	return false
}

// serveV5 serves an exec or attach (run) over v5.channel.k8s.io as the tree's server serves v4
// (createWebSocketStreams, ServeExec, ServeAttach): the same channels, the same first empty
// message, the same Status on the error channel, exit codes as NonZeroExitCode causes when
// exitCodes is set (exec) and every other error as an internal error (what, e.g. "attaching to
// container"). What v5 adds is the close signal: the client's stdin ends when it says so, not
// only when the connection does.
func serveV5(w http.ResponseWriter, r *http.Request, opts *remotecommandserver.Options, exitCodes bool, what string,
	run func(in io.Reader, out, errOut io.WriteCloser, resize <-chan remotecommand.TerminalSize) error) {
	channels := make([]wsstream.ChannelType, closeSignal+1) // IgnoreChannel, but for these:
	if opts.Stdin {
		channels[stdinChannel] = wsstream.ReadChannel
	}
	if opts.Stdout {
		channels[stdoutChannel] = wsstream.WriteChannel
	}
	if opts.Stderr {
		channels[stderrChannel] = wsstream.WriteChannel
	}
	channels[errorChannel] = wsstream.WriteChannel
	channels[resizeChannel] = wsstream.ReadChannel
	channels[closeSignal] = wsstream.ReadChannel
	conn := wsstream.NewConn(map[string]wsstream.ChannelProtocolConfig{
		v5Protocol: {Binary: true, Channels: channels},
	})
	conn.SetIdleTimeout(streamIdleTimeout)
	_, streams, err := conn.Open(w, r)
	if err != nil {
		log.Printf("v5 WebSocket upgrade: %v", err)
		return
	}
	defer conn.Close()

	// the lowest writable channel's empty message tells the client its streams are set up
	switch {
	case opts.Stdout:
		streams[stdoutChannel].Write([]byte{})
	case opts.Stderr:
		streams[stderrChannel].Write([]byte{})
	default:
		streams[errorChannel].Write([]byte{})
	}

	var in io.Reader
	var out, errOut io.WriteCloser
	if opts.Stdin {
		in = streams[stdinChannel]
	}
	if opts.Stdout {
		out = streams[stdoutChannel]
	}
	if opts.Stderr {
		errOut = streams[stderrChannel]
	}
	go func() {
		closed := make([]byte, 1)
		for {
			if _, err := io.ReadFull(streams[closeSignal], closed); err != nil {
				return
			}
			if closed[0] == stdinChannel && opts.Stdin {
				streams[stdinChannel].Close()
			}
		}
	}()
	resize := make(chan remotecommand.TerminalSize)
	go func() {
		defer close(resize)
		sizes := json.NewDecoder(streams[resizeChannel])
		for {
			var size remotecommand.TerminalSize
			if sizes.Decode(&size) != nil {
				return
			}
			resize <- size
		}
	}()

	status := &apierrors.StatusError{ErrStatus: metav1.Status{Status: metav1.StatusSuccess}}
	if err := run(in, out, errOut, resize); err != nil {
		var exit utilexec.ExitError
		if errors.As(err, &exit) && exit.Exited() && exitCodes {
			status = &apierrors.StatusError{ErrStatus: metav1.Status{
				Status: metav1.StatusFailure,
				Reason: remotecommandconsts.NonZeroExitCodeReason,
				Details: &metav1.StatusDetails{Causes: []metav1.StatusCause{{
					Type:    remotecommandconsts.ExitCodeCauseType,
					Message: strconv.Itoa(exit.ExitStatus()),
				}}},
				Message: fmt.Sprintf("command terminated with non-zero exit code: %v", exit),
			}}
		} else {
			status = apierrors.NewInternalError(fmt.Errorf("error %s: %v", what, err))
		}
	}
	encoded, err := json.Marshal(status.Status())
	if err == nil {
		_, err = streams[errorChannel].Write(encoded)
	}
	if err != nil {
		log.Printf("v5 status: %v", err)
	}
}

func (h *host) attachCommand(tty bool) []string {
	if tty {
		return []string{h.shell, "-i"}
	}
	return []string{h.shell}
}

// PortForward implements portforward.PortForwarder: the pod's port is 127.0.0.1:port here. It
// is called once per forwarded connection.
func (h *host) PortForward(name string, uid types.UID, port int32, stream io.ReadWriteCloser) error {
	h.record(portForwardEntry{Time: now(), Kind: "portforward", Namespace: h.namespace, Pod: name, Port: port})
	defer stream.Close()
	conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))), 5*time.Second)
	if err != nil {
		return fmt.Errorf("port-forward to 127.0.0.1:%d: %v", port, err)
	}
	defer conn.Close()
	go func() {
		_, _ = io.Copy(conn, stream) // client -> port
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}()
	_, err = io.Copy(stream, conn) // port -> client, until the port side closes
	if err != nil && !isClosedErr(err) {
		return err
	}
	return nil
}

func isClosedErr(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ECONNRESET) || strings.Contains(err.Error(), "use of closed")
}

func (h *host) track(pgid int, add bool) {
	h.procMu.Lock()
	defer h.procMu.Unlock()
	if add {
		h.procs[pgid] = struct{}{}
	} else {
		delete(h.procs, pgid)
	}
}

// killAll ends every command still running (on shutdown).
func (h *host) killAll() {
	h.procMu.Lock()
	defer h.procMu.Unlock()
	for pgid := range h.procs {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	}
}

// exitError turns a finished command's status into what ServeExec reports to the client.
func exitError(waitErr error) error {
	if waitErr == nil {
		return nil
	}
	var ee *exec.ExitError
	if errors.As(waitErr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok {
			code := ws.ExitStatus()
			if ws.Signaled() {
				code = 128 + int(ws.Signal())
			}
			if code == 0 {
				return nil
			}
			return utilexec.CodeExitError{Err: waitErr, Code: code}
		}
	}
	return waitErr
}

// notStarted reports a command that could not be started the way a shell would: 127 (not
// found) or 126 (not executable), with the reason on the error stream (or stdout with a tty).
func notStarted(err error, errOut io.Writer) error {
	code := 126
	if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
		code = 127
	}
	if errOut != nil {
		fmt.Fprintf(errOut, "vigil-test-kubelet: %v\r\n", err)
	}
	return utilexec.CodeExitError{Err: err, Code: code}
}

func (h *host) command(argv []string, tty bool) *exec.Cmd {
	c := exec.Command(argv[0], argv[1:]...)
	c.Dir = h.workdir
	c.Env = h.env(tty)
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: h.cred}
	return c
}

func (h *host) run(argv []string, in io.Reader, out, errOut io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize) error {
	if len(argv) == 0 {
		return fmt.Errorf("no command given")
	}
	if tty {
		return h.runTTY(argv, in, out, resize)
	}
	return h.runPipes(argv, in, out, errOut)
}

func (h *host) runPipes(argv []string, in io.Reader, out, errOut io.WriteCloser) error {
	c := h.command(argv, false)
	var parentEnds, childEnds []*os.File
	closeAll := func(fs []*os.File) {
		for _, f := range fs {
			f.Close()
		}
	}
	var stdinW *os.File
	if in != nil {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		c.Stdin, stdinW = r, w
		childEnds = append(childEnds, r)
		parentEnds = append(parentEnds, w)
	}
	var copiers sync.WaitGroup
	var readEnds []*os.File
	output := func(dst io.Writer) (*os.File, error) {
		if dst == nil {
			return nil, nil
		}
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		childEnds = append(childEnds, w)
		parentEnds = append(parentEnds, r)
		readEnds = append(readEnds, r)
		copiers.Add(1)
		go func() {
			defer copiers.Done()
			_, _ = io.Copy(dst, r)
		}()
		return w, nil
	}
	var err error
	if c.Stdout, err = output(out); err != nil {
		closeAll(childEnds)
		closeAll(parentEnds)
		return err
	}
	if c.Stderr, err = output(errOut); err != nil {
		closeAll(childEnds)
		closeAll(parentEnds)
		return err
	}
	// os/exec wants a nil interface, not a nil *os.File, for "no stream"
	if out == nil {
		c.Stdout = nil
	}
	if errOut == nil {
		c.Stderr = nil
	}
	if in == nil {
		c.Stdin = nil
	}

	if err := c.Start(); err != nil {
		closeAll(childEnds)
		if stdinW != nil {
			stdinW.Close()
		}
		for _, r := range readEnds {
			r.Close()
		}
		copiers.Wait()
		return notStarted(err, errOut)
	}
	closeAll(childEnds)
	pgid := c.Process.Pid
	h.track(pgid, true)
	defer h.track(pgid, false)

	if stdinW != nil {
		go func() {
			// ends when the client closes its stdin (the child then reads EOF) or when the
			// child has exited and the pipe is closed below
			_, _ = io.Copy(stdinW, in)
			stdinW.Close()
		}()
	}

	waitErr := c.Wait()
	drained := make(chan struct{})
	go func() { copiers.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(drainGrace):
		for _, r := range readEnds {
			r.Close()
		}
		<-drained
	}
	if stdinW != nil {
		stdinW.Close()
	}
	for _, r := range readEnds {
		r.Close()
	}
	return exitError(waitErr)
}

// openPTY returns the master (non-blocking, in Go's poller, so closing it ends a pending read)
// and the slave of a new pseudo-terminal.
func openPTY() (master *os.File, masterFd int, slave *os.File, err error) {
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, -1, nil, fmt.Errorf("open /dev/ptmx: %v", err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil { // unlockpt
		unix.Close(fd)
		return nil, -1, nil, fmt.Errorf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN) // ptsname
	if err != nil {
		unix.Close(fd)
		return nil, -1, nil, fmt.Errorf("ptsname: %v", err)
	}
	name := "/dev/pts/" + strconv.Itoa(n)
	sfd, err := unix.Open(name, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(fd)
		return nil, -1, nil, fmt.Errorf("open %s: %v", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/ptmx"), fd, os.NewFile(uintptr(sfd), name), nil
}

func (h *host) runTTY(argv []string, in io.Reader, out io.WriteCloser, resize <-chan remotecommand.TerminalSize) error {
	master, masterFd, slave, err := openPTY()
	if err != nil {
		return err
	}
	var masterMu sync.Mutex // guards masterFd use against the close below
	masterOpen := true
	setSize := func(size remotecommand.TerminalSize) {
		masterMu.Lock()
		defer masterMu.Unlock()
		if masterOpen && size.Width > 0 && size.Height > 0 {
			_ = unix.IoctlSetWinsize(masterFd, unix.TIOCSWINSZ, &unix.Winsize{Row: size.Height, Col: size.Width})
		}
	}
	closeMaster := func() {
		masterMu.Lock()
		defer masterMu.Unlock()
		if masterOpen {
			masterOpen = false
			master.Close()
		}
	}
	defer closeMaster()

	// the client's first size usually arrives right after the streams are set up: take it
	// before starting, so the program sees its real size from the beginning
	resizeOpen := resize != nil
	if resizeOpen {
		select {
		case size, ok := <-resize:
			if ok {
				setSize(size)
			} else {
				resizeOpen = false
			}
		case <-time.After(100 * time.Millisecond):
		}
	}

	c := h.command(argv, true)
	c.Stdin, c.Stdout, c.Stderr = slave, slave, slave
	c.SysProcAttr.Setctty = true
	c.SysProcAttr.Ctty = 0 // the child's fd 0, the slave
	if err := c.Start(); err != nil {
		slave.Close()
		var w io.Writer
		if out != nil {
			w = out
		}
		return notStarted(err, w)
	}
	slave.Close()
	pgid := c.Process.Pid
	h.track(pgid, true)
	defer h.track(pgid, false)

	// The client is gone when its resize stream ends (it stays open for the whole session):
	// then hang up, as a closed terminal would. The end of stdin alone is no hang-up (a real
	// runtime leaves the command running too); only without a resize stream (old protocols)
	// it is the sign.
	hangUp := func() { _ = syscall.Kill(-pgid, syscall.SIGHUP) }
	if resizeOpen {
		go func() {
			for size := range resize {
				setSize(size)
			}
			hangUp()
		}()
	}
	if in != nil {
		go func() {
			_, _ = io.Copy(master, in)
			if !resizeOpen {
				hangUp()
			}
		}()
	}
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		dst := io.Writer(ioutil.Discard)
		if out != nil {
			dst = out
		}
		// ends with EIO once the last holder of the slave has closed it
		_, _ = io.Copy(dst, master)
	}()

	waitErr := c.Wait()
	select {
	case <-drained:
	case <-time.After(drainGrace):
		closeMaster()
		<-drained
	}
	return exitError(waitErr)
}

// how often a followed log looks for appended bytes
const followPoll = 50 * time.Millisecond

// serveLogs answers with the container's log (the --log-file); with follow=true it goes on
// with every byte appended to the file, flushed as it is read, until the client goes away.
func (h *host) serveLogs(w http.ResponseWriter, r *http.Request, container string) {
	follow := r.URL.Query().Get("follow") == "true"
	f, err := os.Open(h.containerLog)
	if err != nil {
		http.Error(w, fmt.Sprintf("the container's log: %v", err), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	var sent, offset int64
	defer func() {
		h.record(logsEntry{Time: now(), Kind: "logs", Namespace: h.namespace, Pod: h.pod, Container: container, Follow: follow, Bytes: sent})
	}()
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	buf := make([]byte, 32*1024)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			written, werr := w.Write(buf[:n])
			sent += int64(written)
			offset += int64(n)
			if werr != nil {
				return
			}
			continue
		}
		if err != nil && err != io.EOF {
			log.Printf("container log: %v", err)
			return
		}
		if !follow {
			return
		}
		// at the end of what the file holds: everything read so far goes out now
		if flusher != nil {
			flusher.Flush()
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(followPoll):
		}
		if st, err := f.Stat(); err == nil && st.Size() < offset {
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return
			}
			offset = 0
		}
	}
}

type server struct {
	h *host
}

// parse splits /KIND/ns/pod[/uid][/container] (want = the number of segments without uid).
func parse(path, kind string, want int) (segs []string, ok bool) {
	rest := strings.TrimPrefix(path, "/"+kind+"/")
	if rest == path {
		return nil, false
	}
	segs = strings.Split(strings.Trim(rest, "/"), "/")
	switch {
	case len(segs) == want:
		return segs, true
	case len(segs) == want+1: // with the pod uid
		return append(segs[:2], segs[3:]...), true
	}
	return nil, false
}

func (s *server) knownPod(w http.ResponseWriter, ns, pod string) bool {
	if ns != s.h.namespace || pod != s.h.pod {
		http.Error(w, fmt.Sprintf("pod %s/%s does not exist on this node", ns, pod), http.StatusNotFound)
		return false
	}
	return true
}

func (s *server) knownContainer(w http.ResponseWriter, ns, pod, container string) bool {
	if !s.knownPod(w, ns, pod) {
		return false
	}
	if container != s.h.container {
		http.Error(w, fmt.Sprintf("container %q not found in pod %s/%s", container, ns, pod), http.StatusNotFound)
		return false
	}
	return true
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	switch {
	case p == "/healthz":
		io.WriteString(w, "ok")
	case strings.HasPrefix(p, "/exec/"):
		segs, ok := parse(p, "exec", 3)
		if !ok {
			http.NotFound(w, r)
			return
		}
		if !s.knownContainer(w, segs[0], segs[1], segs[2]) {
			return
		}
		opts, err := remotecommandserver.NewOptions(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		cmd := r.URL.Query()["command"]
		if len(cmd) == 0 {
			http.Error(w, "no command given", http.StatusBadRequest)
			return
		}
		h := streamHost{s.h, transportOf(r)}
		if offersV5(r) {
			serveV5(w, r, opts, true, "executing command in container",
				func(in io.Reader, out, errOut io.WriteCloser, resize <-chan remotecommand.TerminalSize) error {
					return h.ExecInContainer(segs[1], "", segs[2], cmd, in, out, errOut, opts.TTY, resize, 0)
				})
			return
		}
		remotecommandserver.ServeExec(w, r, h, segs[1], "", segs[2], cmd, opts,
			streamIdleTimeout, remotecommandconsts.DefaultStreamCreationTimeout, remotecommandconsts.SupportedStreamingProtocols)
	case strings.HasPrefix(p, "/attach/"):
		segs, ok := parse(p, "attach", 3)
		if !ok {
			http.NotFound(w, r)
			return
		}
		if !s.knownContainer(w, segs[0], segs[1], segs[2]) {
			return
		}
		opts, err := remotecommandserver.NewOptions(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		h := streamHost{s.h, transportOf(r)}
		if offersV5(r) {
			serveV5(w, r, opts, false, "attaching to container",
				func(in io.Reader, out, errOut io.WriteCloser, resize <-chan remotecommand.TerminalSize) error {
					return h.AttachContainer(segs[1], "", segs[2], in, out, errOut, opts.TTY, resize)
				})
			return
		}
		remotecommandserver.ServeAttach(w, r, h, segs[1], "", segs[2], opts,
			streamIdleTimeout, remotecommandconsts.DefaultStreamCreationTimeout, remotecommandconsts.SupportedStreamingProtocols)
	case strings.HasPrefix(p, "/portForward/"):
		segs, ok := parse(p, "portForward", 2)
		if !ok {
			http.NotFound(w, r)
			return
		}
		if !s.knownPod(w, segs[0], segs[1]) {
			return
		}
		opts, err := portforward.NewV4Options(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		portforward.ServePortForward(w, r, s.h, segs[1], "", opts,
			streamIdleTimeout, remotecommandconsts.DefaultStreamCreationTimeout, portforward.SupportedProtocols)
	case strings.HasPrefix(p, "/containerLogs/"):
		segs, ok := parse(p, "containerLogs", 3)
		if !ok {
			http.NotFound(w, r)
			return
		}
		if !s.knownContainer(w, segs[0], segs[1], segs[2]) {
			return
		}
		s.h.serveLogs(w, r, segs[2])
	default:
		http.NotFound(w, r)
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:25250", "address to serve HTTPS on")
	certFile := flag.String("tls-cert", "", "serving certificate (PEM)")
	keyFile := flag.String("tls-key", "", "serving key (PEM)")
	clientCA := flag.String("client-ca", "", "CA whose client certificates (the apiserver's) are accepted")
	namespace := flag.String("namespace", "default", "namespace of the one pod served")
	pod := flag.String("pod", "shell", "name of the one pod served")
	container := flag.String("container", "shell", "name of its one container")
	execLog := flag.String("exec-log", "", "JSON-lines log of every exec, attach, port-forward and log request")
	containerLog := flag.String("log-file", "", "the container's log: what pods/log serves (follow=true tails it)")
	workdir := flag.String("workdir", "/", "working directory (and HOME) of the commands")
	shell := flag.String("shell", "/bin/sh", "shell that attach starts")
	runAs := flag.String("run-as", "", "run commands as this user (default: the kubelet's own user)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	if *certFile == "" || *keyFile == "" || *clientCA == "" || *execLog == "" || *containerLog == "" {
		log.Fatal("--tls-cert, --tls-key, --client-ca, --exec-log and --log-file are required")
	}
	lf, err := os.OpenFile(*execLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0644)
	if err != nil {
		log.Fatal(err)
	}
	h := &host{namespace: *namespace, pod: *pod, container: *container, containerLog: *containerLog,
		workdir: *workdir, shell: *shell, logFile: lf, procs: map[int]struct{}{}}
	if *runAs != "" {
		u, err := user.Lookup(*runAs)
		if err != nil {
			log.Fatalf("--run-as: %v", err)
		}
		uid, _ := strconv.ParseUint(u.Uid, 10, 32)
		gid, _ := strconv.ParseUint(u.Gid, 10, 32)
		h.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
		h.runAsName = u.Username
	}

	caPEM, err := ioutil.ReadFile(*clientCA)
	if err != nil {
		log.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		log.Fatalf("no certificate in %s", *clientCA)
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{
		Handler: &server{h: h},
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    pool,
			MinVersion:   tls.VersionTLS12,
			NextProtos:   []string{"http/1.1"}, // upgrades (SPDY, WebSocket) need HTTP/1.1
		},
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		log.Printf("%v: stopping, ending the commands still running", s)
		h.killAll()
		ln.Close()
		os.Exit(0)
	}()

	log.Printf("vigil-test-kubelet serving pod %s/%s (container %s) on https://%s; exec log %s", *namespace, *pod, *container, ln.Addr(), *execLog)
	if err := srv.ServeTLS(ln, "", ""); err != nil && err != http.ErrServerClosed {
		log.Fatal(err)
	}
}
