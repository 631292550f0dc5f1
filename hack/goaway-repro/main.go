// Command goaway-repro calls svcplane's webhook server (started by the ignored test
// webhook::server::tests::goaway_repro_server) the way kube-apiserver does: golang.org/x/net/http2's
// Transport (http2.ConfigureTransport on an http.Transport, TLS), many concurrent POSTs of an
// AdmissionReview-sized body, and counts the errors by kind. A http2.GoAwayError is what the
// apiserver reports as "http2: server sent GOAWAY and closed the connection" (it does not retry it).
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8443", "server address")
	caFile := flag.String("ca", "ca.pem", "CA that signed the server's certificate (PEM)")
	total := flag.Int("n", 100000, "requests to send")
	workers := flag.Int("c", 32, "concurrent requests")
	bodySize := flag.Int("body", 3000, "request body size (bytes)")
	rcvbuf := flag.Int("rcvbuf", 0, "the client socket's SO_RCVBUF (bytes; 0: the default). A small one keeps the "+
		"server's responses queued in its kernel for a while, as a real network does, rather than delivered at once")
	flag.Parse()

	pem, err := os.ReadFile(*caFile)
	if err != nil {
		panic(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		panic("no CA certificate in " + *caFile)
	}
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	if *rcvbuf > 0 {
		dialer.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, *rcvbuf)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	t1 := &http.Transport{
		DialContext:         dialer.DialContext,
		TLSClientConfig:     &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"},
		MaxIdleConnsPerHost: 100,
		TLSHandshakeTimeout: 10 * time.Second,
	}
	t2, err := http2.ConfigureTransports(t1)
	if err != nil {
		panic(err)
	}
	// As k8s.io/apimachinery's SetTransportDefaults does.
	t2.ReadIdleTimeout = 30 * time.Second
	t2.PingTimeout = 15 * time.Second
	client := &http.Client{Transport: t1, Timeout: 10 * time.Second}

	body := []byte(`{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"x","pad":"` +
		strings.Repeat("a", *bodySize) + `"}}`)
	url := "https://" + *addr + "/mutate-services?timeout=10s"

	var sent, ok atomic.Int64
	var mu sync.Mutex
	errs := map[string]int{}
	var examples []string
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < *workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sent.Add(1) <= int64(*total) {
				req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
				var local string
				req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
					GotConn: func(i httptrace.GotConnInfo) { local = i.Conn.LocalAddr().String() },
				}))
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				if err == nil {
					_, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err == nil {
					ok.Add(1)
					continue
				}
				kind := err.Error()
				var ga http2.GoAwayError
				if errors.As(err, &ga) {
					kind = "GoAwayError"
				}
				mu.Lock()
				errs[kind]++
				if len(examples) < 200 {
					examples = append(examples, time.Now().Format("15:04:05.000000")+" conn "+local+": "+err.Error())
				}
				mu.Unlock()
			}
		}()
	}
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(5 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				mu.Lock()
				fmt.Fprintf(os.Stderr, "%s ok=%d errors=%v\n", time.Since(start).Round(time.Second), ok.Load(), errs)
				mu.Unlock()
			}
		}
	}()
	wg.Wait()
	close(done)
	for _, e := range examples {
		fmt.Println("example:", e)
	}
	keys := make([]string, 0, len(errs))
	nerr := 0
	for k, v := range errs {
		keys = append(keys, k)
		nerr += v
	}
	sort.Strings(keys)
	fmt.Printf("requests=%d ok=%d errors=%d elapsed=%s\n", *total, ok.Load(), nerr, time.Since(start).Round(time.Millisecond))
	for _, k := range keys {
		fmt.Printf("  %6d  %s\n", errs[k], k)
	}
}
