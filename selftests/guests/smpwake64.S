/* SPDX-License-Identifier: GPL-2.0 */
/*
 * SMP start-up as an OS does it on a PC platform with ACPI 6.4 (a flat binary at
 * 0x100000, entered in long mode; run with rvmm-run --machine pc --cpus N): finds the
 * RSDP in the BIOS area, the MADT through the XSDT, counts the processor entries and
 * finds the multiprocessor wake-up mailbox; wakes every AP through it (APIC ID,
 * wake-up vector, command 1, then waits for the firmware's acknowledgement, command
 * 0). Each AP starts at `ap_entry` in 64-bit mode on the firmware's identity map, takes
 * a stack, reads its initial APIC ID (CPUID 1), writes a marker, and halts with
 * interrupts off. The BSP waits for every marker, prints them and exits with 0x2c.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set MARKERS, 0x200000		/* a byte per APIC ID */
	.set STACKS, 0x300000		/* 4 KiB per AP */
_start:
	lea	rsi, [rip + s_hello]
	call	puts
	/* The RSDP: "RSD PTR " on a 16-byte boundary in 0xe0000-0xfffff. */
	mov	rdi, 0xe0000
	movabs	rax, 0x2052545020445352
1:	cmp	[rdi], rax
	je	2f
	add	rdi, 16
	cmp	rdi, 0x100000
	jb	1b
	lea	rsi, [rip + s_nordsp]
	jmp	fail
2:	mov	rbx, [rdi + 24]			/* XSDT */
	mov	ecx, [rbx + 4]
	lea	r8, [rbx + rcx]			/* end */
	lea	r9, [rbx + 36]
3:	cmp	r9, r8
	jae	no_madt
	mov	rdx, [r9]
	cmp	dword ptr [rdx], 0x43495041	/* "APIC" */
	je	4f
	add	r9, 8
	jmp	3b
4:	/* MADT entries from offset 44: type, length. */
	mov	ecx, [rdx + 4]
	lea	r8, [rdx + rcx]
	lea	r9, [rdx + 44]
	xor	r12d, r12d			/* processors */
	xor	r13d, r13d			/* mailbox */
	lea	r14, [rip + apic_ids]
5:	cmp	r9, r8
	jae	7f
	movzx	eax, byte ptr [r9]
	cmp	al, 0
	jne	6f
	movzx	ecx, byte ptr [r9 + 3]
	mov	[r14 + r12], cl
	inc	r12d
6:	cmp	al, 0x10
	jne	8f
	mov	r13, [r9 + 8]
8:	movzx	eax, byte ptr [r9 + 1]
	add	r9, rax
	jmp	5b
7:	lea	rsi, [rip + s_cpus]
	call	puts
	mov	rax, r12
	call	putdec
	call	nl
	test	r13, r13
	jnz	9f
	lea	rsi, [rip + s_nombox]
	jmp	fail
9:	/* Wake each AP (APIC IDs after the first entry, the BSP's). */
	mov	r15d, 1
10:	cmp	r15d, r12d
	jae	12f
	movzx	eax, byte ptr [r14 + r15]
	mov	[r13 + 4], eax
	lea	rax, [rip + ap_entry]
	mov	[r13 + 8], rax
	mov	word ptr [r13], 1
11:	pause
	cmp	word ptr [r13], 0
	jne	11b
	movzx	eax, byte ptr [r14 + r15]
13:	pause
	cmp	byte ptr [MARKERS + rax], 0
	je	13b
	lea	rsi, [rip + s_ap]
	call	puts
	call	putdec
	lea	rsi, [rip + s_up]
	call	puts
	inc	r15d
	jmp	10b
12:	lea	rsi, [rip + s_allup]
	call	puts
	mov	al, 0x2c
	out	0xf4, al
	hlt

no_madt:
	lea	rsi, [rip + s_nomadt]
fail:
	call	puts
	mov	al, 1
	out	0xf4, al
	hlt

ap_entry:
	mov	eax, 1
	cpuid
	shr	ebx, 24
	mov	eax, ebx
	shl	eax, 12
	lea	rsp, [STACKS + rax + 0x1000]
	mov	byte ptr [MARKERS + rbx], 0x5a
	cli
	hlt

putdec:
	push	rax
	push	rbx
	push	rcx
	push	rdx
	mov	rbx, 10
	xor	ecx, ecx
1:	xor	edx, edx
	div	rbx
	push	rdx
	inc	ecx
	test	rax, rax
	jnz	1b
2:	pop	rax
	add	al, '0'
	call	putc
	loop	2b
	pop	rdx
	pop	rcx
	pop	rbx
	pop	rax
	ret

nl:	push	rax
	mov	al, '\n'
	call	putc
	pop	rax
	ret

putc:
	push	rdx
	mov	dx, 0x3f8
	out	dx, al
	pop	rdx
	ret

puts:
	push	rsi
	push	rax
1:	lodsb
	test	al, al
	jz	2f
	call	putc
	jmp	1b
2:	pop	rax
	pop	rsi
	ret

	.data
apic_ids: .space 16
s_hello: .asciz	"smpwake64: looking for the MADT\n"
s_nordsp: .asciz "no RSDP\n"
s_nomadt: .asciz "no MADT\n"
s_nombox: .asciz "no multiprocessor wake-up mailbox\n"
s_cpus:	.asciz	"processors: "
s_ap:	.asciz	"ap "
s_up:	.asciz	": up\n"
s_allup: .asciz	"smpwake64: all APs up\n"
s_fail:	.asciz	"smpwake64: FAILED\n"
